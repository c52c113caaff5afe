"""Bad input on the command line: one clear ``error:`` line on stderr, exit 2, no traceback.

Each case runs ``tunelab.cli.main`` in-process; one case and ``--help`` also run as a real
subprocess. ``--debug`` turns the one-liner back into the raised ``TunelabError``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


# ---- helpers ----------------------------------------------------------------------------


def generate_argv(model: str | Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "hi", "--device", "cpu", *extra]


def run_cli(capsys, argv: list[str]) -> str:
    """Run ``main(argv)``, check it failed with exactly one ``error:`` line; return that line."""
    capsys.readouterr()  # drop what fixtures printed (e.g. transformers' progress bars)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("error: ")
    return err.strip()


@pytest.fixture
def tiny_copy(make_tiny_model, tmp_path) -> Path:
    """A private copy of the tiny llama model, safe to damage."""
    return Path(shutil.copytree(make_tiny_model("llama"), tmp_path / "model"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Never touch the user's cache, never pick up a device from the environment."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNELAB_DEVICE", raising=False)


# ---- bad input, one line each -------------------------------------------------------------


@pytest.mark.parametrize("spec", ["/nonexistent/x", "./nope/model", "/nonexistent/model.gguf"])
def test_missing_path(capsys, spec):
    line = run_cli(capsys, generate_argv(spec))
    assert spec in line
    assert "does not exist" in line


def test_dir_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = run_cli(capsys, generate_argv(tmp_path / "empty"))
    assert str(tmp_path / "empty") in line and "config.json" in line


def test_unknown_model_type(capsys, tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_copy / "config.json").write_text(json.dumps(config))
    line = run_cli(capsys, generate_argv(tiny_copy))
    assert "'gpt2'" in line
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in line


def test_truncated_safetensors(capsys, tiny_copy):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = run_cli(capsys, generate_argv(tiny_copy))
    assert "model.safetensors" in line
    assert "truncated" in line or "damaged" in line


def test_dir_without_tokenizer(capsys, tiny_copy):
    for name in TOKENIZER_FILES:
        (tiny_copy / name).unlink(missing_ok=True)
    line = run_cli(capsys, generate_argv(tiny_copy))
    assert "tokenizer" in line and str(tiny_copy) in line


def test_dir_with_a_tokenizer_config_but_no_tokenizer_json(capsys, tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    line = run_cli(capsys, generate_argv(tiny_copy))
    assert "tokenizer.json is missing: copy the tokenizer files" in line


@pytest.mark.parametrize(
    ("device", "hint"),
    [
        ("tpu", "cpu"),  # unknown type: lists the valid ones
        ("cuda:x", "cuda:0"),  # bad index: shows the right form
        ("cuda:99", "cuda"),  # no such device (whether or not CUDA is there)
    ],
)
def test_unknown_device(capsys, make_tiny_model, device, hint):
    argv = generate_argv(make_tiny_model("llama"), "--device", device)  # the last --device wins
    line = run_cli(capsys, argv)
    assert device in line
    assert hint in line.replace(device, "").lower()


def test_invalid_sampling_flag(capsys, make_tiny_model):
    line = run_cli(capsys, generate_argv(make_tiny_model("llama"), "--temperature", "-1"))
    assert "temperature" in line and ">= 0" in line


def test_invalid_sampling_flag_fails_before_loading(capsys, monkeypatch):
    from tunelab.engine.simple import SimpleGenerator

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(SimpleGenerator, "load", no_load)
    for verb in ("generate", "chat"):
        argv = [verb, "--model", "default", "--top-p", "0"]
        line = run_cli(capsys, argv + (["--prompt", "hi"] if verb == "generate" else []))
        assert "top_p" in line


def test_convert_refuses_existing_out(capsys, make_tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    line = run_cli(capsys, ["convert", str(make_tiny_model("llama")), "--out", str(out)])
    assert str(out) in line and "already exists" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # left untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


@pytest.mark.parametrize("verb", ["generate", "chat"])
@pytest.mark.parametrize("where", ["before", "after"])  # --debug before or after the verb
def test_debug_shows_the_traceback_and_keeps_the_exit_code(capsys, verb, where):
    argv = [verb, "--model", "/nonexistent/x", "--device", "cpu"]
    if verb == "generate":
        argv += ["--prompt", "hi"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "TunelabError" in err
    assert "error: " in err and "/nonexistent/x" in err


def test_debug_shows_damaged_weights(tiny_copy, capsys):
    (tiny_copy / "model.safetensors").write_bytes(b"\x00" * 16)
    assert main(["--debug", *generate_argv(tiny_copy)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "model.safetensors" in err


def test_quiet_after_the_verb_and_unknown_flags_name_the_closest(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "hi", "--temprature", "0", "-q"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "tunelab generate: error: unrecognized arguments: --temprature 0" in err
    assert "(did you mean --temperature?)" in err


# ---- as a real process ------------------------------------------------------------------


def run_module(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_DEVICE"}
    env["TUNELAB_HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_subprocess_missing_model(tmp_path):
    proc = run_module("generate", "--model", "/nonexistent/x", "--prompt", "hi", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "/nonexistent/x" in proc.stderr
    assert proc.stdout == ""


VERB_FLAGS = {
    "env": ["--json"],
    "convert": ["src", "--out", "--dtype", "--overwrite"],
    "generate": [
        "--model",
        "--device",
        "--dtype",
        "--prompt",
        "--raw",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--repetition-penalty",
        "--seed",
        "--stop",
        "--system",
    ],
    "chat": [
        "--model",
        "--device",
        "--dtype",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--repetition-penalty",
        "--seed",
        "--stop",
        "--system",
    ],
}


@pytest.mark.parametrize("verb", sorted(VERB_FLAGS))
def test_subprocess_help(verb, tmp_path):
    proc = run_module(verb, "--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: tunelab {verb}")
    for flag in VERB_FLAGS[verb]:
        assert flag in proc.stdout, f"{flag} missing from `tunelab {verb} --help`"


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--debug", "--quiet", "--version", *VERB_FLAGS):
        assert flag in out


# ---- the happy path keeps stdout clean ------------------------------------------------------


def test_generate_prints_only_the_answer_on_stdout(capsys, make_tiny_model):
    from tunelab.engine.sampler import SamplingParams
    from tunelab.engine.simple import SimpleGenerator

    path = make_tiny_model("llama")
    argv = generate_argv(path, "--temperature", "0", "--max-tokens", "5")
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    expected = SimpleGenerator.load(str(path), device="cpu").chat(
        [{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=5)
    )
    assert out == expected + "\n"  # logs ("loaded ...") go to stderr, never into the answer
    assert "loaded" in err and "Traceback" not in err


def test_an_empty_or_undecodable_prompt_is_one_error(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", "--prompt", "-", "--device", "cpu"]) == 2
    assert "standard input (--prompt -) was empty" in capsys.readouterr().err
    assert main(["generate", "--prompt", "\udcff", "--device", "cpu"]) == 2  # argv byte 0xff
    assert "the byte 0xff, which is not UTF-8 text" in capsys.readouterr().err
