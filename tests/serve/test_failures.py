"""An engine failure is a 500 in OpenAI's shape and the server keeps serving (real socket)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.serve.conftest import free_port

uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def inproc(tiny_dir):
    from tunelab.engine.async_engine import AsyncEngine
    from tunelab.serve.app import create_app

    engine = AsyncEngine.from_pretrained(str(tiny_dir), device="cpu")
    app = create_app(engine, "tiny")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url, engine
    server.should_exit = True
    thread.join(30)


def test_engine_failure_is_500_and_server_survives(inproc, monkeypatch):
    url, engine = inproc
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}

    def boom(*a, **k):
        raise RuntimeError("simulated engine failure")

    monkeypatch.setattr(engine, "add_request", boom)
    resp = httpx.post(url + "/v1/completions", json=body)
    assert resp.status_code == 500
    assert resp.json()["error"]["type"] == "server_error"
    assert "simulated engine failure" in resp.json()["error"]["message"]
    stream = httpx.post(url + "/v1/completions", json={**body, "stream": True})
    assert stream.status_code == 200 and '"error"' in stream.text and "[DONE]" in stream.text
    monkeypatch.undo()
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200
    assert httpx.get(url + "/health").status_code == 200
