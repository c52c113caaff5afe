"""``tunelab serve`` flags, backend delegation and ``tunelab deploy k8s``."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import yaml

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.serve.commands import backend_command, backend_env, parse_adapters
from tunelab.serve.k8s import write_k8s


def test_bad_adapter_fails_before_the_model_loads(capsys):
    assert main(["serve", "--model", "default", "--adapter", "a=/x"]) == 2
    assert "--adapter a=/x: adapter directory /x does not exist" in capsys.readouterr().err


def test_serve_refuses_an_address_it_cannot_listen_on_before_the_model_loads(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/nonexistent", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--model", "/nonexistent", "--port", "99999"]) == 2
    assert "--port 99999 is not a port number" in capsys.readouterr().err
    assert main(["serve", "--model", "/nonexistent", "--max-queue", "-1"]) == 2
    assert "--max-queue must be >= 0" in capsys.readouterr().err


def test_deploy_takes_hub_specs_and_debug_after_the_target(tmp_path, capsys):
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--model", "hf://org/name", "--out", str(out), "--debug"]) == 0
    assert (out / "Dockerfile").is_file()
    with pytest.raises(SystemExit):
        main(["deploy", "k8s", "--model", "org/name", "--out", str(out), "--imgae", "x"])
    assert "tunelab deploy k8s: error" in capsys.readouterr().err


def test_deploy_refuses_bad_numbers_and_a_missing_model(tmp_path, capsys):
    base = ["deploy", "k8s", "--out", str(tmp_path / "k8s")]
    assert main([*base, "--model", "org/name", "--gpus", "-1"]) == 2
    assert "--gpus must be >= 0" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "k8s").exists()


def test_adapter_syntax():
    assert parse_adapters(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}
    with pytest.raises(TunelabError, match="NAME=PATH"):
        parse_adapters(["nope"])
    with pytest.raises(TunelabError, match="given twice"):
        parse_adapters(["a=/x", "a=/y"])
    with pytest.raises(TunelabError, match="the base model's name"):
        parse_adapters(["tiny=/x"], served_model_name="tiny")


def _args(**kw) -> argparse.Namespace:
    base = dict(host="127.0.0.1", port=9000, api_key="k", dtype="bf16", max_num_seqs=8,
                device=None)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("backend", ["vllm", "sglang", "lmdeploy"])
def test_backend_command_or_clear_error(backend, monkeypatch):
    if importlib.util.find_spec(backend) is None:
        with pytest.raises(TunelabError, match=f"pip install {backend}"):
            backend_command(backend, "/m", _args(), "name", {})
        monkeypatch.setattr(importlib.util, "find_spec", lambda _: object())
    cmd = backend_command(backend, "/m", _args(), "name", {"a": "/ad"})
    assert "/m" in cmd and "9000" in cmd and "name" in cmd and "bfloat16" in cmd
    assert any("a=/ad" in c for c in cmd)


@pytest.mark.parametrize("backend", ["vllm", "sglang", "lmdeploy"])
def test_backend_maps_every_flag_or_refuses_it(backend, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda _: object())
    tuned = _args(memory_fraction=0.5, no_prefix_caching=True, max_num_batched_tokens=4096)
    if backend == "lmdeploy":  # no equivalents: refused, never dropped silently
        with pytest.raises(TunelabError, match="no equivalent of --max-num-batched-tokens, "
                           "--memory-fraction, --no-prefix-caching"):  # fmt: skip
            backend_command(backend, "/m", tuned, "name", {})
    else:
        cmd = backend_command(backend, "/m", tuned, "name", {})
        assert "0.5" in cmd and "4096" in cmd
        assert {"--no-enable-prefix-caching", "--disable-radix-cache"} & set(cmd)
    with pytest.raises(TunelabError, match="no equivalent of --max-queue"):
        backend_command(backend, "/m", _args(max_queue=8), "name", {})
    assert "--max-queue" not in " ".join(backend_command(backend, "/m", _args(), "name", {}))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert backend_env(backend, _args(device="cuda:1"))["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # cuda:1 is then physical GPU 3
    assert backend_env(backend, _args(device="cuda:1"))["CUDA_VISIBLE_DEVICES"] == "3"


def test_deploy_k8s(tmp_path, capsys):
    out, model = tmp_path / "k8s", tmp_path / "My_Model"
    model.mkdir()
    assert main(["deploy", "k8s", "--model", str(model), "--out", str(out),
                 "--port", "8080"]) == 0  # fmt: skip
    dockerfile = (out / "Dockerfile").read_text()
    assert "8080" in dockerfile and "/models/my-model" in dockerfile
    deployment, service = yaml.safe_load_all((out / "deployment.yaml").read_text())
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8080
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8080}
    assert service["spec"]["ports"][0]["port"] == 8080
    (isvc,) = yaml.safe_load_all((out / "inferenceservice.yaml").read_text())
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    pred = isvc["spec"]["predictor"]["containers"][0]
    assert pred["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "my-model" in pred["args"]
    with pytest.raises(TunelabError, match="--overwrite"):
        write_k8s("/models/My_Model", out)
