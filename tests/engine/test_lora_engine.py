"""Per-request LoRA adapters in the engine: parity with transformers + PEFT, mixed batches.

Two different random adapters per model (``lora_helpers``): "a1" written by peft (rank 4),
"a2" by our trainer's LoRA (rank 8, rsLoRA; so a1 is zero-padded to rank 8 in the stacked
layers). Greedy outputs must be token-identical to ``PeftModel.generate`` (fp32, CPU) and
base requests to HF's.
"""

from __future__ import annotations

import asyncio
import functools
import json

import pytest
import torch

from tests.engine.conftest import prompts_of_lengths
from tests.engine.lora_helpers import hf_model, write_adapters
from tunelab.engine.async_engine import AsyncEngine
from tunelab.engine.infer import run_infer
from tunelab.engine.lora_layers import LoraStep
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError
from tunelab.models.loading import load_model

peft = pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
LENGTHS = [3, 11, 17, 6]


@pytest.fixture(scope="session")
def adapters(make_tiny_model, tmp_path_factory):
    """``adapters(model_type)`` -> {"a1": dir, "a2": dir} for that tiny model."""

    made: dict[str, dict[str, str]] = {}

    def make(model_type: str = "llama") -> dict[str, str]:
        if model_type not in made:
            out = tmp_path_factory.mktemp(f"lora-{model_type}")
            made[model_type] = write_adapters(make_tiny_model(model_type), out)
        return made[model_type]

    return make


@functools.cache
def _peft_model(path: str, adapter: str):
    model = peft.PeftModel.from_pretrained(hf_model(path), adapter).eval()
    model.generation_config.eos_token_id = None
    return model


@functools.cache
def _peft_greedy(path: str, adapter: str, prompt: tuple[int, ...], max_new: int):
    with torch.inference_mode():
        out = _peft_model(path, adapter).generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=0,
        )
    return list(out[0, len(prompt) :].tolist())


@pytest.fixture
def reference(make_tiny_model, adapters, hf_greedy):
    """``reference(model_type, lora, prompt, max_new)``: HF (base) or HF + PEFT tokens."""

    def run(model_type: str, lora: str | None, prompt: list[int], max_new: int) -> list[int]:
        path = make_tiny_model(model_type)
        if lora is None:
            return hf_greedy(path, prompt, max_new)
        return _peft_greedy(str(path), adapters(model_type)[lora], tuple(prompt), max_new)

    return run


@pytest.fixture
def lora_llm(tiny_llm, adapters):
    def make(model_type: str = "llama", **kw):
        return tiny_llm(model_type, adapters=adapters(model_type), **kw)

    return make


def tokens(outs) -> list[list[int]]:
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_mixed_batch_matches_peft(lora_llm, reference, model_type):
    """Base, a1 and a2 requests of different lengths share steps; each matches its reference."""
    llm = lora_llm(model_type)
    prompts = prompts_of_lengths(LENGTHS)
    loras = [None, "a1", "a2", "a1"]
    jobs = [(p, lo) for p in prompts for lo in (None, "a1", "a2")] + list(
        zip(prompts, loras, strict=True)
    )
    got = tokens(llm.generate([p for p, _ in jobs], GREEDY, lora=[lo for _, lo in jobs]))
    for (prompt, lora), out in zip(jobs, got, strict=True):
        assert out == reference(model_type, lora, prompt, GREEDY.max_tokens), (lora, prompt)
    by = {lo: got[i::3][: len(prompts)] for i, lo in enumerate((None, "a1", "a2"))}
    assert by[None] != by["a1"] and by["a1"] != by["a2"]  # the adapters matter


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"max_num_batched_tokens": 8},  # chunks and decodes of several adapters in a step
        {"block_size": 4, "max_cache_tokens": 48, "max_num_batched_tokens": 16},  # preemption
    ],
)
def test_mixed_batch_equals_each_alone(lora_llm, engine_kwargs):
    """Rows of one adapter are not contiguous in such steps (the gather/scatter path)."""
    llm = lora_llm("llama", **engine_kwargs)
    prompts = prompts_of_lengths([9, 4, 13, 7, 5], seed=1)
    loras = ["a2", None, "a1", "a2", "a1"]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    alone = [llm.generate(p, params, lora=lo) for p, lo in zip(prompts, loras, strict=True)]
    together = llm.generate(prompts, params, lora=loras)
    assert tokens(together) == [tokens(out)[0] for out in alone]
    if "max_cache_tokens" in engine_kwargs:
        assert sum(o.outputs[0].num_preemptions for o in together) > 0


def test_prefix_cache_is_per_adapter(lora_llm, reference):
    llm = lora_llm("llama", block_size=4)
    prompt = prompts_of_lengths([14], seed=2)[0]
    first = llm.generate(prompt, GREEDY)  # caches the prompt's blocks under the base model
    outs = llm.generate([prompt] * 3, GREEDY, lora=[None, "a1", "a2"])
    assert [o.metrics.num_cached_tokens for o in outs] == [12, 0, 0]
    again = llm.generate([prompt] * 2, GREEDY, lora=["a1", "a2"])
    assert [o.metrics.num_cached_tokens for o in again] == [12, 12]
    for out, lora in zip(
        [*first, *outs, *again], [None, None, "a1", "a2", "a1", "a2"], strict=True
    ):
        assert tokens([out])[0] == reference("llama", lora, prompt, GREEDY.max_tokens)


def test_unknown_adapter_fails_alone(lora_llm, reference):
    llm = lora_llm("llama")
    prompts = prompts_of_lengths([5, 6], seed=3)
    outs = llm.generate(prompts, GREEDY, lora=["nope", "a1"])
    assert outs[0].outputs[0].finish_reason == "error"
    assert "unknown LoRA adapter 'nope'" in outs[0].error and "'a1', 'a2'" in outs[0].error
    assert tokens(outs[1:])[0] == reference("llama", "a1", prompts[1], GREEDY.max_tokens)
    with pytest.raises(TunelabError, match="got 3 adapter names for 2 prompts"):
        llm.generate(prompts, GREEDY, lora=["a1", None, None])


def test_runtime_load_unload_and_reuse_of_a_name(tiny_llm, adapters, reference):
    llm = tiny_llm("llama", block_size=4)
    paths = adapters("llama")
    prompt = prompts_of_lengths([13], seed=4)[0]
    llm.load_adapter("x", paths["a1"])
    assert tokens(llm.generate(prompt, GREEDY, lora="x"))[0] == reference(
        "llama", "a1", prompt, GREEDY.max_tokens
    )
    engine = llm.engine
    engine.add_request(prompt, GREEDY, request_id="busy", lora="x")
    with pytest.raises(TunelabError, match="in use by 1 unfinished request"):
        llm.unload_adapter("x")
    engine.abort("busy")
    engine.pop_output("busy")
    llm.unload_adapter("x")
    with pytest.raises(TunelabError, match="already loaded"):
        llm.load_adapter("y", paths["a2"]) and llm.load_adapter("y", paths["a1"])
    # The name comes back with other weights: no KV block of the old "x" may be reused.
    llm.load_adapter("x", paths["a2"])
    out = llm.generate(prompt, GREEDY, lora="x")
    assert out[0].metrics.num_cached_tokens == 0
    assert tokens(out)[0] == reference("llama", "a2", prompt, GREEDY.max_tokens)


def test_bad_adapters_are_refused_with_their_name(tiny_llm, make_tiny_model, tmp_path):
    llm = tiny_llm("llama")
    other = make_tiny_model("llama", hidden_size=32, intermediate_size=64)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(other), cfg).save_pretrained(str(tmp_path / "small"))
    with pytest.raises(TunelabError, match=r"adapter 'small' .*shape \(4, 32\).*\(4, 64\)"):
        llm.load_adapter("small", tmp_path / "small")
    with pytest.raises(TunelabError, match=r"adapter 'nothing' .*adapter_config\.json is missing"):
        llm.load_adapter("nothing", tmp_path)
    big = peft.LoraConfig(r=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(hf_model(make_tiny_model("llama")), big).save_pretrained(
        str(tmp_path / "r8")
    )
    strict = tiny_llm("llama", max_lora_rank=4)
    with pytest.raises(TunelabError, match="rank 8, above this engine's max_lora_rank=4"):
        strict.load_adapter("r8", tmp_path / "r8")
    config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "lm_head"]
    (tmp_path / "r8" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TunelabError, match=r"adapter 'r8' .*unknown LoRA target.*lm_head"):
        llm.load_adapter("r8", tmp_path / "r8")
    assert llm.engine.adapters == {} and not llm.engine.lora.layers  # nothing was touched


def test_base_requests_run_the_plain_linears(lora_llm):
    """Without adapter tokens in a step the LoRA layers see no groups (the fast path)."""
    llm = lora_llm("llama")
    layers = list(llm.engine.lora.layers.values())
    assert len(layers) == 2 * 7  # a2 targets every linear of both layers
    seen = []
    layer = layers[0]
    original = type(layer).forward

    def spy(self, x):
        seen.append(list(self.step.groups))
        return original(self, x)

    layer.forward = spy.__get__(layer)
    llm.generate(prompts_of_lengths([4], seed=5), SamplingParams(max_tokens=2))
    assert seen and all(g == [] for g in seen)
    seen.clear()
    llm.generate(prompts_of_lengths([4], seed=5), SamplingParams(max_tokens=2), lora="a1")
    assert seen and all(len(g) == 1 and isinstance(g[0][1], slice) for g in seen)
    assert layer.step.groups == []  # cleared after every step


def test_lora_step_groups_rows_by_slot():
    step = LoraStep()
    step.set([-1, 0, 0, 1, 0, -1, 1], torch.device("cpu"))
    groups = dict(step.groups)
    assert groups[0].tolist() == [1, 2, 4] and groups[1].tolist() == [3, 6]
    step.set([-1, 2, 2, 2], torch.device("cpu"))
    assert step.groups == [(2, slice(1, 4))]


def test_async_engine_with_adapters(tiny_llm, adapters, reference):
    llm = tiny_llm("llama")
    prompts = prompts_of_lengths([5, 8, 6], seed=6)

    async def main():
        engine = AsyncEngine(llm.engine)
        try:
            await engine.load_adapter("a1", adapters("llama")["a1"])
            with pytest.raises(TunelabError, match="adapter 'bad'"):
                await engine.load_adapter("bad", "/nonexistent")

            async def one(prompt, lora):
                ids = []
                async for delta in engine.add_request(prompt, GREEDY, lora=lora):
                    assert delta.error is None
                    ids += delta.token_ids
                return ids

            loras = [None, "a1", "a1"]
            return await asyncio.gather(*map(one, prompts, loras))
        finally:
            await asyncio.to_thread(engine.shutdown)

    got = asyncio.run(main())
    for prompt, lora, ids in zip(prompts, [None, "a1", "a1"], got, strict=True):
        assert ids == reference("llama", lora, prompt, GREEDY.max_tokens)


def test_infer_with_adapter(make_tiny_model, adapters, tmp_path):
    path = make_tiny_model("llama")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in
                           enumerate(["Hello", "The capital of France"])))  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for lora in (None, "a1"):
        dst = tmp_path / f"out-{lora}.jsonl"
        adapter = adapters("llama")[lora] if lora else None
        run_infer(str(path), src, dst, params, "cpu", "fp32", adapter=adapter, show_progress=False)
        outs[lora] = [json.loads(line)["output"] for line in dst.read_text().splitlines()]
    llm_outs = tiny_llm_outputs(path, adapters("llama")["a1"], params)
    assert outs["a1"] == llm_outs and outs["a1"] != outs[None]


def tiny_llm_outputs(path, adapter: str, params: SamplingParams) -> list[str]:
    from tunelab.engine.llm import LLM
    from tunelab.models.loading import load_tokenizer

    model = load_model(path, "cpu", torch.float32)
    llm = LLM(model, tokenizer=load_tokenizer(path), adapters={"a": adapter})
    msgs = [[{"role": "user", "content": t}] for t in ("Hello", "The capital of France")]
    return [o.outputs[0].text for o in llm.generate(msgs, params, lora="a")]


def test_an_adapter_saved_with_its_own_chat_template_is_prompted_with_it(
    make_tiny_model, adapters, tmp_path
):
    """tunelab's trainer saves the template it trained on beside the adapter (data.template);
    chat requests on that adapter use it, the base and other adapters keep the base's."""
    import shutil

    from tunelab.data.templates import BUILTIN_TEMPLATES
    from tunelab.engine.llm import LLM
    from tunelab.engine.prompts import encode_chat
    from tunelab.models.loading import load_tokenizer

    path = make_tiny_model("llama")
    own = tmp_path / "alpaca-adapter"
    shutil.copytree(adapters("llama")["a2"], own)
    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = BUILTIN_TEMPLATES["alpaca"]
    tokenizer.save_pretrained(str(own))
    llm = LLM(load_model(path, "cpu", torch.float32), tokenizer=load_tokenizer(path),
              adapters={"own": str(own), "plain": adapters("llama")["a1"]})  # fmt: skip
    assert llm.engine.adapters["own"].chat_template == BUILTIN_TEMPLATES["alpaca"]
    assert llm.engine.adapters["plain"].chat_template is None
    chat = [{"role": "user", "content": "hello world"}]
    params = SamplingParams(temperature=0, max_tokens=1)
    outs = llm.generate([chat, chat, chat], params, lora=["own", "plain", None])
    alpaca = encode_chat(llm.tokenizer, chat, chat_template=BUILTIN_TEMPLATES["alpaca"])
    assert outs[0].prompt_token_ids == alpaca
    assert outs[1].prompt_token_ids == outs[2].prompt_token_ids == llm.encode_chat(chat)
    assert alpaca != llm.encode_chat(chat)


def test_a_qlora_adapter_loads_with_a_warning_about_its_base(tiny_llm, adapters, tmp_path, caplog):
    import shutil

    import torch

    from tunelab.export.qlora import write_marker

    qlora = tmp_path / "qlora"
    shutil.copytree(adapters("llama")["a1"], qlora)
    write_marker(qlora, torch.bfloat16)
    llm = tiny_llm("llama")
    with caplog.at_level("WARNING"):
        llm.load_adapter("q", str(qlora))
    assert "trained with QLoRA on an NF4-rounded base" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        llm.load_adapter("plain", adapters("llama")["a1"])
    assert "QLoRA" not in caplog.text
