"""The OpenAI API of a real server process, driven by the official client and httpx."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(server.url + "/version").json()


def test_chat_stream_equals_non_stream_and_usage(server, client):
    kw = dict(model="tiny", messages=CHAT, temperature=0, max_tokens=6)
    full = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert full.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    prompt = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()["count"]
    assert full.usage.prompt_tokens == prompt
    assert full.usage.completion_tokens == 6 and full.usage.total_tokens == prompt + 6


def test_completions_stream_equals_non_stream(client):
    kw = dict(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=5)
    full = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == full.choices[0].text


def test_completions_prompt_forms_and_echo(client):
    out = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2,
                                    temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 4
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, echo=True)
    assert out.choices[0].text.startswith("Hello")


def test_n_samples(client):
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, n=3, max_tokens=4, seed=1, extra_body={"ignore_eos": True}
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 12


def test_stop_string(client):
    kw = dict(model="tiny", prompt="abc", temperature=0, max_tokens=12)
    text = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    if len(text) < 4:
        pytest.skip("greedy output too short to pick a stop string")
    stop = text[2:4]
    out = client.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_seed_reproducible(client):
    kw = dict(model="tiny", messages=CHAT, temperature=1.0, max_tokens=8, seed=42)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_logprobs(client):
    out = client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)  # greedy
    out = client.completions.create(model="tiny", prompt="hi", max_tokens=2, logprobs=1,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert len(out.choices[0].logprobs.tokens) == 2


def test_echo_with_logprobs_scores_the_prompt_like_transformers(client, tiny_dir):
    """lm-eval style scoring: echo + logprobs return the prompt tokens' logprobs too."""
    import torch
    import transformers

    prompt = [5, 17, 42, 99, 7, 63]
    kw = dict(model="tiny", prompt=prompt, max_tokens=2, temperature=0, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**kw).choices[0]
    lp = full.logprobs
    assert len(lp.tokens) == len(prompt) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = [logits[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    assert lp.token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)

    chunks = list(client.completions.create(**kw, stream=True))
    streamed = [t for c in chunks for t in (c.choices[0].logprobs.token_logprobs or [])]
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize(
    "body, status, needle",
    [
        ('{"model": "tiny", "prompt": ', 400, "not valid JSON"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
        ('{"model": "tiny", "prompt": "x", "temperature": [1]}', 400, "temperature"),
        ('{"model": "nope", "prompt": "x"}', 404, "does not exist"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": 1000}', 400, "256 tokens"),
        ('{"model": "tiny", "prompt": "x", "suffix": "y"}', 400, "suffix"),
        ('{"model": "tiny", "prompt": [99999]}', 400, "vocabulary"),
        ('{"model": "tiny", "prompt": []}', 400, "empty"),
        ('{"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 2}', 400, "min_tokens"),
        (
            '{"model": "tiny", "prompt": "x", "min_tokens": 1, "stop_token_ids": [99999]}',
            400,
            "stop token id 99999",
        ),
        ('{"model": "tiny", "prompt": "x\\ud800"}', 400, "surrogate"),
        ('{"model": "tiny\\udfff", "prompt": "x"}', 400, "surrogate"),
    ],
)
def test_error_shapes(server, body, status, needle):
    resp = httpx.post(server.url + "/v1/completions", content=body,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert needle in _error(resp, status)["message"]


def test_nulls_mean_the_defaults(server):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": None, "n": None,
            "logprobs": None, "presence_penalty": None, "frequency_penalty": None}  # fmt: skip
    resp = httpx.post(server.url + "/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"]) == 1
    chat = {"model": "tiny", "messages": CHAT, "max_tokens": 2, "logprobs": None, "n": None}
    assert httpx.post(server.url + "/v1/chat/completions", json=chat).status_code == 200


def test_bad_requests_leave_the_server_healthy(server):
    """A stop id outside the vocabulary once stopped the engine loop for every client."""
    bad = {"model": "tiny", "prompt": "x", "min_tokens": 1, "stop_token_ids": [99999]}
    for stream in (False, True):
        _error(httpx.post(server.url + "/v1/completions", json={**bad, "stream": stream}), 400)
    chat = '{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800"}]}'
    resp = httpx.post(server.url + "/v1/chat/completions", content=chat,
                      headers={"content-type": "application/json"})  # fmt: skip
    assert "surrogate" in _error(resp, 400)["message"]
    ok = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=ok).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)
    resp = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    _error(resp, 400)
    resp = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny", "messages": CHAT, "max_completion_tokens": 999},
    )
    assert "maximum context length is 256" in _error(resp, 400)["message"]


def test_tokenize_roundtrip(server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "hello"}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "hello" in text
    _error(httpx.post(server.url + "/detokenize", json={"tokens": [-1]}), 400)
    with_prompt, without = (
        httpx.post(server.url + "/tokenize", json={"messages": CHAT, "add_generation_prompt": g})
        for g in (True, False)
    )
    assert len(with_prompt.json()["tokens"]) > len(without.json()["tokens"])


def test_api_key(launch):
    server = launch("--api-key", "sekret")
    resp = httpx.get(server.url + "/v1/models")
    assert _error(resp, 401)["code"] == "invalid_api_key"
    bad = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    _error(bad, 401)
    latin1 = httpx.get(server.url + "/v1/models", headers=[(b"authorization", b"Bearer caf\xe9")])
    _error(latin1, 401)  # not a 500 from comparing non-ASCII text
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
    assert ok.models.list().data[0].id == "tiny"
    assert httpx.get(server.url + "/health").status_code == 200  # probes stay open
