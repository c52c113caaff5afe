"""Bad input fails the one request with a clear message; the others go on."""

from __future__ import annotations

import pytest
import torch

from tests.engine.conftest import prompts_of_lengths
from tunelab.engine.paged_attention import select_backend
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_prompt_longer_than_the_context_fails_alone(tiny_llm):
    llm = tiny_llm("llama")  # context 256
    good, too_long = prompts_of_lengths([5, 300], seed=1)
    outs = llm.generate([good, too_long, good], GREEDY)
    assert outs[1].outputs[0].finish_reason == "error"
    assert "300 tokens" in outs[1].error and "context is 256" in outs[1].error
    assert [len(outs[i].outputs[0].token_ids) for i in (0, 2)] == [4, 4]
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids


def test_request_larger_than_the_whole_cache_is_rejected(tiny_llm):
    llm = tiny_llm("llama", max_cache_tokens=64, block_size=4)
    prompt = prompts_of_lengths([10], seed=2)[0]
    big = SamplingParams(n=4, max_tokens=20, ignore_eos=True)  # 4 x 30 tokens > 64
    outs = llm.generate([prompt, prompt], [big, GREEDY])
    assert outs[0].outputs[0].finish_reason == "error" and "max_cache_tokens" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length"
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_request_that_fills_the_cache_exactly_runs(tiny_llm):
    """13 prompt + 4 new tokens need 16 slots (the last sampled token is never cached): a
    16-token cache runs it, one prompt token more is refused."""
    llm = tiny_llm("llama", max_cache_tokens=16, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    fits, too_long = prompts_of_lengths([13, 14], seed=3)
    outs = llm.generate([fits, too_long], params)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 4
    assert outs[1].outputs[0].finish_reason == "error" and "needs 17 tokens" in outs[1].error


@pytest.mark.parametrize(
    ("prompt", "message"),
    [([], "empty"), ([5, 99999], "outside the vocabulary"), ([1.5], "a prompt is text")],
)
def test_bad_prompts_fail_alone(tiny_llm, prompt, message):
    llm = tiny_llm("llama")
    outs = llm.generate([prompt, [5, 6, 7]], GREEDY)
    assert outs[0].outputs[0].finish_reason == "error"
    assert message in outs[0].error
    assert len(outs[1].outputs[0].token_ids) == 4


def test_stop_token_id_outside_the_vocabulary_fails_alone(tiny_llm):
    llm = tiny_llm("llama")  # vocab 416; min_tokens is what turns stop ids into banned logits
    bad = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[99999])
    outs = llm.generate([[5, 6, 7], [5, 6, 7]], [bad, GREEDY])
    assert outs[0].outputs[0].finish_reason == "error"
    assert "stop token id 99999 is outside the vocabulary" in outs[0].error
    assert len(outs[1].outputs[0].token_ids) == 4


def test_text_with_a_lone_surrogate_fails_alone(tiny_llm):
    llm = tiny_llm("llama")
    chat = [{"role": "user", "content": "hi \ud800"}]
    outs = llm.generate(["bad \udfff text", chat, [5, 6, 7]], GREEDY)
    assert "lone UTF-16 surrogate" in outs[0].error and "lone UTF-16 surrogate" in outs[1].error
    assert len(outs[2].outputs[0].token_ids) == 4


def test_params_list_must_match_prompts(tiny_llm):
    with pytest.raises(TunelabError, match="one per prompt"):
        tiny_llm("llama").generate([[1, 2], [3, 4]], [GREEDY])


def test_backend_selection():
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu).name == select_backend("sdpa", cpu).name == "sdpa"
    with pytest.raises(TunelabError, match="triton_kernels is not available on cpu"):
        select_backend("triton", cpu)
    with pytest.raises(TunelabError, match="unknown attention backend"):
        select_backend("flash", cpu)


def test_invalid_engine_params_name_the_field():
    for kwargs, field in [
        ({"n": 0}, "n must"),
        ({"min_p": 2}, "min_p"),
        ({"logprobs": -1}, "logp"),
    ]:
        with pytest.raises(TunelabError, match=field):
            SamplingParams(**kwargs)


def test_text_content_parts_render_as_training_joins_them(tiny_llm):
    llm = tiny_llm("llama")
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}],
        }
    ]
    joined = [{"role": "user", "content": "hi\nthere"}]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    outs = llm.generate([parts, joined, image], GREEDY)
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids == llm.encode_chat(joined)
    assert "content parts of type 'image_url' are not supported" in outs[2].error
