"""A real ``tunelab serve`` process on a loopback port, over a tiny random model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: str):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


def start_server(model_dir, tmp_path, *flags: str, timeout: float = 90) -> Server:
    port = free_port()
    log_path = str(tmp_path / f"server-{port}.log")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", "--model", str(model_dir),
           "--served-model-name", "tiny", "--port", str(port), *flags]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up:\n{server.log()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def tiny_dir(make_tiny_model):
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def launch(tiny_dir, tmp_path_factory) -> Iterator[Callable[..., Server]]:
    """``launch(*flags)`` -> a running server (stopped at the end of the session)."""
    servers: list[Server] = []
    tmp = tmp_path_factory.mktemp("serve")

    def make(*flags: str) -> Server:
        server = start_server(tiny_dir, tmp, *flags)
        servers.append(server)
        return server

    yield make
    for s in servers:
        stop_server(s)


@pytest.fixture(scope="session")
def server(launch) -> Server:
    return launch()
