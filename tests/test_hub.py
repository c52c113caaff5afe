"""``resolve_model``: local directories, GGUF caching, and hub specs failing clearly offline."""

from __future__ import annotations

import json
import socket
import sys
import types
from pathlib import Path

import pytest

from tunelab import hub
from tunelab.errors import TunelabError
from tunelab.hub import resolve_model


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Private TUNELAB_HOME, cwd in tmp_path, and no network: any connect attempt is recorded."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty HF cache, also in huggingface_hub's import-time constants."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.fixture
def fake_convert(monkeypatch):
    """Replace the GGUF converter with one that writes a config.json and counts its calls."""
    import tunelab.models.convert

    calls: list[tuple[Path, Path]] = []

    def convert_gguf(gguf, out, dtype=None, overwrite=False):
        calls.append((Path(gguf), Path(out)))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return Path(out)

    monkeypatch.setattr(tunelab.models.convert, "convert_gguf", convert_gguf)
    return calls


# ---- local directories and paths ----------------------------------------------------------


def test_hf_directory_is_returned_as_is(make_tiny_model):
    path = make_tiny_model("llama")
    assert resolve_model(str(path)) == path
    assert resolve_model(path) == path  # a Path works too
    assert resolve_model(f"  {path}  ") == path  # surrounding whitespace is ignored


def test_relative_directory(make_tiny_model, tmp_path):
    (tmp_path / "m").symlink_to(make_tiny_model("llama"))
    assert resolve_model("./m") == Path("m")
    assert (resolve_model("m") / "config.json").exists()  # an existing dir wins over a hub id


def test_directory_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(TunelabError, match=r"no config\.json") as exc:
        resolve_model(str(tmp_path / "weights"))
    assert str(tmp_path / "weights") in str(exc.value)


@pytest.mark.parametrize("spec", ["./nope", "/abs/nope", "~/surely/not/here", "a/b/c", "foo"])
def test_missing_path(spec):
    with pytest.raises(TunelabError, match="does not exist") as exc:
        resolve_model(spec)
    assert repr(spec) in str(exc.value)


def test_existing_file_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TunelabError, match=r"notes\.txt"):
        resolve_model("notes.txt")


def test_missing_gguf(tmp_path):
    with pytest.raises(TunelabError, match=r"GGUF file .*missing\.gguf does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_empty_spec():
    with pytest.raises(TunelabError, match="empty model spec"):
        resolve_model("  ")


# ---- GGUF and the default model: converted once, then cached ------------------------------


def test_gguf_is_converted_once(tmp_path, fake_convert):
    gguf = tmp_path / "src" / "tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)

    first = resolve_model(str(gguf))
    assert first.parent == tmp_path / "home" / "models"
    assert first.name.startswith("gguf-tiny-")
    assert (first / "config.json").exists()
    assert fake_convert == [(gguf, first)]

    assert resolve_model(str(gguf)) == first  # reused, not converted again
    assert len(fake_convert) == 1

    gguf.write_bytes(b"GGUF" + b"\0" * 100)  # a changed file is a new model
    third = resolve_model(str(gguf))
    assert third != first and len(fake_convert) == 2


def test_default_is_converted_once(tmp_path, monkeypatch, fake_convert):
    gguf = tmp_path / "default.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(hub, "default_gguf_path", lambda: gguf)
    path = resolve_model("default")
    assert path == tmp_path / "home" / "models" / hub.DEFAULT_NAME
    assert resolve_model("default") == path
    assert fake_convert == [(gguf, path)]


# ---- hubs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "repo_id"), [("hf://org/name", "org/name"), ("org/name",) * 2])
def test_hf_hub_offline(hf_offline, spec, repo_id):
    with pytest.raises(TunelabError) as exc:
        resolve_model(spec)
    message = str(exc.value)
    assert repr(spec) in message and repr(repo_id) in message
    assert "offline" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message  # the CLI prints it as one line
    assert not any(hf_offline.rglob("*.safetensors"))


def test_hf_hub_error_names_endpoint(hf_offline, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    with pytest.raises(TunelabError, match=r"mirror\.example"):
        resolve_model("hf://org/name")


def test_modelscope_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    with pytest.raises(TunelabError) as exc:
        resolve_model("modelscope://org/name")
    assert "pip install 'tunelab[modelscope]'" in str(exc.value)
    assert "modelscope://org/name" in str(exc.value)


@pytest.mark.parametrize("error", [Exception(), RuntimeError("first line\nsecond line")])
def test_hub_failure_is_one_line(monkeypatch, error):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise error

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(TunelabError) as exc:
        resolve_model("org/name")
    message = str(exc.value)
    assert "\n" not in message and "second line" not in message
    assert ("first line" if str(error) else "Exception") in message


def test_modelscope_download(monkeypatch, tmp_path):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(repo_id)
        if repo_id == "org/missing":
            raise ValueError("")
        return str(tmp_path)

    fake = types.ModuleType("modelscope")
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    assert resolve_model("modelscope://org/name") == tmp_path
    with pytest.raises(TunelabError, match="'org/missing': ValueError"):
        resolve_model("modelscope://org/missing")
    assert calls == ["org/name", "org/missing"]


def test_adapters_record_a_base_name_peft_can_load(tmp_path):
    from tunelab.hub import peft_base_name

    local = tmp_path / "model"
    local.mkdir()
    assert peft_base_name("hf://org/name", local) == "org/name"
    assert peft_base_name("org/name", local) == "org/name"
    for spec in ("default", str(local), "model.gguf", "modelscope://org/name"):
        assert peft_base_name(spec, local) == str(local.resolve())


def test_hub_download_skips_duplicate_weight_formats(monkeypatch, tmp_path):
    """Mistral repos ship consolidated.safetensors beside the HF shards: not fetched."""
    import fnmatch

    import huggingface_hub

    files = ["config.json", "model-00001-of-00002.safetensors", "consolidated.safetensors",
             "tokenizer.json", "original/params.json", "pytorch_model.bin"]  # fmt: skip
    fetched = []

    def snapshot_download(repo_id, allow_patterns, ignore_patterns=()):
        for f in files:
            allowed = any(fnmatch.fnmatch(f, p) for p in allow_patterns)
            if allowed and not any(fnmatch.fnmatch(f, p) for p in ignore_patterns):
                fetched.append(f)
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolve_model("hf://org/mistral")
    assert fetched == ["config.json", "model-00001-of-00002.safetensors", "tokenizer.json"]


def test_a_file_that_is_no_model_is_named_as_such(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    with pytest.raises(TunelabError, match="is a file, not a model directory"):
        resolve_model(str(notes))
