"""``serve --adapter NAME=PATH``: adapters as models of their own, driven by the openai client.

The expected texts come from the offline engine (``LLM``) in this process, whose adapter
outputs are checked against transformers + PEFT in tests/engine/test_lora_engine.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.engine.lora_helpers import write_adapters
from tunelab.engine.llm import LLM
from tunelab.engine.sampler import SamplingParams
from tunelab.models.loading import load_model, load_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("peft")

MODELS = ["tiny", "a1", "a2"]  # the base (--served-model-name tiny) and two adapters
MAX_TOKENS = 8
QUESTIONS = ["Say something.", "What is the capital of France?", "hello world"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dir, tmp_path_factory):
    return write_adapters(tiny_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def lora_server(launch, adapter_dirs):
    return launch(*(f for n, p in adapter_dirs.items() for f in ("--adapter", f"{n}={p}")))


@pytest.fixture(scope="module")
def client(lora_server):
    return openai.OpenAI(base_url=lora_server.url + "/v1", api_key="none", max_retries=0)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def expected(tiny_dir, adapter_dirs) -> dict[tuple[str, str], str]:
    """(model, question) -> the offline engine's greedy text."""
    model = load_model(tiny_dir, "cpu", torch.float32)
    llm = LLM(model, tokenizer=load_tokenizer(tiny_dir), adapters=adapter_dirs)
    jobs = [(m, q) for m in MODELS for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    loras = [None if m == "tiny" else m for m, _ in jobs]
    outs = llm.generate([chat(q) for _, q in jobs], params, lora=loras)
    return {job: out.outputs[0].text for job, out in zip(jobs, outs, strict=True)}


def ask(client, model: str, question: str, stream: bool = False) -> str:
    kw = dict(model=model, messages=chat(question), temperature=0, max_tokens=MAX_TOKENS,
              extra_body={"ignore_eos": True})  # fmt: skip
    if stream:
        chunks = client.chat.completions.create(**kw, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    out = client.chat.completions.create(**kw)
    assert out.model == model and out.usage.completion_tokens == MAX_TOKENS
    return out.choices[0].message.content


def test_models_lists_base_and_adapters(client, adapter_dirs):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == MODELS
    assert getattr(cards["tiny"], "parent", None) is None
    for name in ("a1", "a2"):
        assert cards[name].parent == "tiny" and cards[name].root == adapter_dirs[name]


def test_chat_with_an_adapter_equals_the_engine(client, expected):
    for model in MODELS:
        assert ask(client, model, QUESTIONS[0]) == expected[(model, QUESTIONS[0])], model
    assert len({expected[(m, QUESTIONS[0])] for m in MODELS}) == 3  # the adapters matter
    assert ask(client, "a2", QUESTIONS[1], stream=True) == expected[("a2", QUESTIONS[1])]


def test_completions_with_an_adapter(client, tiny_dir, adapter_dirs):
    model = load_model(tiny_dir, "cpu", torch.float32)
    llm = LLM(model, tokenizer=load_tokenizer(tiny_dir), adapters={"a1": adapter_dirs["a1"]})
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = llm.generate("Once upon a time", params, lora="a1")[0].outputs[0].text
    out = client.completions.create(model="a1", prompt="Once upon a time", temperature=0,
                                    max_tokens=5, extra_body={"ignore_eos": True})  # fmt: skip
    assert out.choices[0].text == want and out.model == "a1"


def test_concurrent_base_and_adapters_are_all_right(client, expected):
    jobs = [(m, q) for q in QUESTIONS for m in MODELS] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: ask(client, *job), jobs))
    assert got == [expected[job] for job in jobs]


def test_unknown_model_is_404_naming_what_is_served(client):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "a3", QUESTIONS[0])
    assert err.value.body["code"] == "model_not_found"
    assert "'tiny', 'a1', 'a2'" in err.value.body["message"]
