"""The offline API: prompt forms, per-prompt params, streaming, chat on the engine."""

from __future__ import annotations

import io

from tunelab.chat import run_chat
from tunelab.engine.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_prompt_forms_and_order(tiny_llm):
    llm = tiny_llm("qwen3")
    messages = [{"role": "user", "content": "hello world"}]
    ids = llm.encode_chat(messages)
    assert (
        ids
        == llm.tokenizer(
            llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
    )
    outs = llm.generate(["hello world", messages, ids], GREEDY)
    assert outs[1].prompt_token_ids == ids == outs[2].prompt_token_ids
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[0].prompt_token_ids == llm.encode_text("hello world")
    single = llm.generate(messages, GREEDY)  # one prompt, not a list of prompts
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    metrics = outs[0].metrics
    assert 0 <= metrics.ttft <= metrics.e2e


def test_params_per_prompt(tiny_llm):
    llm = tiny_llm("llama")
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [5, 6, 7]], [GREEDY, short])
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 2]
    assert outs[0].outputs[0].token_ids[:2] == outs[1].outputs[0].token_ids


def test_stream_yields_the_generated_text(tiny_llm):
    llm = tiny_llm("llama")
    text = llm.generate("The capital of France", GREEDY)[0].outputs[0].text
    assert "".join(llm.stream("The capital of France", GREEDY)) == text
    assert not llm.engine.requests


def test_chat_repl_runs_on_the_engine(tiny_llm):
    llm = tiny_llm("llama", block_size=4)
    out = io.StringIO()
    run_chat(llm, GREEDY, stdin=io.StringIO("hello world\nThe capital\n/exit\n"), stdout=out)
    assert out.getvalue().count("You >> ") == 3
    # The second turn re-sends the first: its blocks come from the prefix cache.
    assert llm.engine.block_manager.hits > 0
