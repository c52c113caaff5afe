"""``tunelab data prepare`` / ``tunelab data show``: stats table, errors, the bundled examples."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import parse_overrides

REPO = Path(__file__).resolve().parents[2]
STATS_ROWS = (
    "examples read",
    "skipped",
    "truncated",
    "dropped: too long",
    "dropped: no trained tokens",
    "train examples",
    "val examples",
    "tokens (train)",
    "trained tokens (train)",
    "packing efficiency at 64",
    "packing (data.packing)",
)


def chat(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }


@pytest.fixture
def config(tmp_path, make_tiny_model):
    """A config (tiny ChatML tokenizer, cache under tmp_path) training on train.jsonl."""

    def make(lines: list[str] | None = None, **data: Any) -> Path:
        lines = lines if lines is not None else [json.dumps(chat(i)) for i in range(8)]
        (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        section = {"train": "train.jsonl", "cache_dir": str(tmp_path / "cache"), **data}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({"model": str(make_tiny_model("llama")), "data": section}))
        return path

    return make


def stat(out: str, name: str) -> str:
    """The value in the stats table's row ``name``."""
    match = re.search(rf"{re.escape(name)}\s*[│|]\s*(\S+)", out)
    assert match, f"no row {name!r} in:\n{out}"
    return match.group(1)


def test_prepare_prints_the_stats_table(config, capsys):
    path = config()
    assert main(["data", "prepare", str(path), "--data.max_length", "64"]) == 0
    out = capsys.readouterr().out
    for name in STATS_ROWS:
        stat(out, name)
    assert stat(out, "examples read") == "8" and stat(out, "skipped") == "0"
    assert stat(out, "train examples") == "8" and int(stat(out, "tokens (train)")) > 0
    assert 0 < int(stat(out, "trained tokens (train)")) < int(stat(out, "tokens (train)"))
    assert 0 < float(stat(out, "packing efficiency at 64").rstrip("%")) <= 100
    assert "tokenized" in out
    cache = [line for line in out.splitlines() if line.startswith("cache: ")]
    assert len(cache) == 1 and Path(cache[0][len("cache: ") :]).is_dir()  # one line, unwrapped
    assert main(["data", "prepare", str(path), "--data.max_length", "64"]) == 0
    again = capsys.readouterr().out
    assert "cache hit" in again and stat(again, "tokens (train)") == stat(out, "tokens (train)")


def test_prepare_reports_skipped_line_with_file_and_line(config, capsys):
    lines = [json.dumps(chat(i)) for i in range(4)]
    lines.insert(2, '{"messages": [oops')
    path = config(lines, on_error="skip", max_length=64)
    assert main(["data", "prepare", str(path)]) == 0
    out = capsys.readouterr().out
    assert stat(out, "examples read") == "4" and stat(out, "skipped") == "1"
    where = f"{path.parent / 'train.jsonl'}:3"
    skipped = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1, out  # on one line, never wrapped
    assert where in skipped[0] and "malformed JSON" in skipped[0]


def test_prepare_on_error_fail_exits_2_naming_file_and_line(config, capsys):
    lines = [json.dumps(chat(i)) for i in range(4)]
    lines.insert(2, '{"messages": [oops')
    path = config(lines, on_error="fail")
    assert main(["data", "prepare", str(path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert f"{path.parent / 'train.jsonl'}:3" in errors[0]


def test_show_marks_trained_text_when_not_a_tty(config, capsys):
    path = config()
    assert main(["data", "show", str(path), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "trained text inside [[ ]]" in out.splitlines()[0]  # the legend
    assert out.count("\n--- ") == 2
    body = out.split("\n", 1)[1]  # after the legend
    trained = re.findall(r"\[\[(.*?)\]\]", body, flags=re.S)
    assert len(trained) == 2
    assert "It is 0." in trained[0] and "It is 2." in trained[1]
    assert not any("What is" in t for t in trained)  # the prompt is not trained
    assert "\x1b[" not in out


def test_show_says_why_an_example_is_dropped_or_truncated(config, capsys):
    path = config()
    assert main(["data", "show", str(path), "-n", "1", "--data.max_length", "20"]) == 0
    out = capsys.readouterr().out
    assert "truncated to data.max_length=20" in out or "(dropped: no trained tokens)" in out
    args = ["--data.max_length", "20", "--data.truncation", "drop"]
    assert main(["data", "show", str(path), "-n", "1", *args]) == 0
    assert "(dropped: longer than data.max_length=20)" in capsys.readouterr().out


def test_data_verbs_read_past_every_training_key(config, capsys):
    import dataclasses

    from tunelab.data.commands import TRAINING_SECTIONS
    from tunelab.train.config import TrainConfig

    top = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "data"}
    assert top <= set(TRAINING_SECTIONS)
    path = config(max_length=64)
    job = yaml.safe_load(path.read_text())
    job.update(method="lora", train={"max_steps": 3}, output_dir="runs/x", resume="never")
    path.write_text(yaml.safe_dump({**job, "overwrite": True}))
    assert main(["data", "prepare", str(path)]) == 0
    capsys.readouterr()


def test_unknown_data_key_suggests_the_right_one(config, capsys):
    path = config()
    assert main(["data", "prepare", str(path), "--data.max_lenght", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "data.max_length" in err and "max_lenght" in err


def test_override_value_with_a_colon_stays_a_string(config, capsys):
    path = config()
    args = ["--data.system", "Note: answer briefly.", "--data.max_length", "64"]
    assert main(["data", "show", str(path), "-n", "1", *args]) == 0
    assert "Note: answer briefly." in capsys.readouterr().out


def test_overrides_parse_yaml_scalars_and_flow_collections_only():
    args = ["--data.system", "Note: be brief", "--data.label_set", "[a, b]"]
    args += ["--data.columns", "{text: body}", "--data.max_length=64", "--data.val", "null"]
    assert parse_overrides(args) == {
        "data": {
            "system": "Note: be brief",
            "label_set": ["a", "b"],
            "columns": {"text": "body"},
            "max_length": 64,
            "val": None,
        }
    }
    assert parse_overrides(["--data.prompt", "- {title}"]) == {"data": {"prompt": "- {title}"}}
    for text in ("Rule #1 is brevity", "#1 rule: be brief"):  # not YAML comments
        assert parse_overrides(["--data.system", text]) == {"data": {"system": text}}
    assert parse_overrides(["--data.system", '"quoted #x"']) == {"data": {"system": "quoted #x"}}


def test_bundled_instruct_data_with_tiny_tokenizer(tmp_path, make_tiny_model, capsys):
    job = {
        "model": str(make_tiny_model("llama")),
        "data": {
            "train": [str(REPO / "examples/data/instruct/alpaca.jsonl")],
            "val": str(REPO / "examples/data/instruct/sharegpt.jsonl"),
            "cache_dir": str(tmp_path / "cache"),
            "max_length": 256,
            "max_val_samples": 20,
        },
    }
    path = tmp_path / "instruct.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["data", "prepare", str(path)]) == 0
    out = capsys.readouterr().out
    assert stat(out, "examples read") == "500" and stat(out, "val examples") == "20"
    assert main(["data", "show", str(path), "-n", "1"]) == 0
    assert "[[" in capsys.readouterr().out


# Every recipe but lora_papers (tested in detail below); papers recipes tokenize 3300 examples.
RECIPES = [p for p in sorted((REPO / "examples").rglob("*.yaml")) if p.stem != "lora_papers"]


@pytest.mark.parametrize(
    "recipe",
    [
        pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if "papers" in p.stem else [])
        for p in RECIPES
    ],
)
def test_every_bundled_recipe_prepares(recipe, tmp_path, make_tiny_model, capsys):
    args = ["--data.cache_dir", str(tmp_path)]
    if yaml.safe_load(recipe.read_text()).get("model", "default") != "default":
        # A large or remote model: its data section is tested with the tiny tokenizer.
        args += ["--model", str(make_tiny_model("llama"))]
    assert main(["data", "prepare", str(recipe), *args]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert int(stat(out, "train examples")) > 0 and stat(out, "skipped") == "0"


@pytest.mark.slow
def test_bundled_lora_papers_example(tmp_path, capsys):
    config = str(REPO / "examples" / "lora_papers.yaml")
    cache = ["--data.cache_dir", str(tmp_path / "cache")]
    assert main(["data", "prepare", config, *cache]) == 0
    out = capsys.readouterr().out
    assert stat(out, "examples read") == "3300" and stat(out, "skipped") == "0"
    n_val = min(300, yaml.safe_load(Path(config).read_text())["data"].get("max_val_samples") or 300)
    assert stat(out, "train examples") == "3000" and stat(out, "val examples") == str(n_val)
    assert main(["data", "show", config, "-n", "2"]) == 0
    out = capsys.readouterr().out
    trained = re.findall(r"\[\[(.*?)\]\]", out.split("\n", 1)[1], flags=re.S)
    labels = ["cs.CL", "cs.CV", "cs.LG", "q-bio", "astro-ph", "econ"]
    assert len(trained) == 2 and all(any(x in t for x in labels) for t in trained)


@pytest.mark.slow
def test_bench_data_prepare_runs(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "data_prepare.py"), "--n", "50"]
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ours" in proc.stdout and "examples/s" in proc.stdout and "ratio" in proc.stdout
