"""``tunelab train`` on the command line: bad input fails before the model loads, the run-dir
policy (refuse / --overwrite / resume), --dry-run, and every recipe in examples/."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from tests.train.helpers import model_available_offline, read_rows, write_chats
from tunelab import device as dev
from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.train.checkpoint import list_checkpoints
from tunelab.train.commands import run_train
from tunelab.train.config import load_train_config

EXAMPLES_DIR = Path(__file__).parents[2] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.rglob("*.yaml"))


@pytest.fixture
def recipe(make_tiny_model, tmp_path) -> Path:
    """A YAML recipe for the tiny llama on 8 conversations, output in tmp_path/run."""
    config = {
        "model": str(make_tiny_model("llama")),
        "method": "lora",
        "lora": {"rank": 4, "alpha": 8},
        "data": {
            "train": "chats.jsonl",  # relative to the recipe
            "max_length": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 1, "batch_size": 4, "device": "cpu", "precision": "fp32"},
        "output_dir": str(tmp_path / "run"),
    }
    write_chats(tmp_path / "chats.jsonl", 8)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the error")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load the model fails the test."""
    monkeypatch.setattr("tunelab.models.loading.load_model", _no_load)


def fails(capsys, argv: list[str]) -> str:
    """``tunelab -q train ...`` exits 2 with an ``error:`` line; return that line."""
    capsys.readouterr()
    code = main(["-q", "train", *argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def succeeds(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(["-q", "train", *argv])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--train.lr_rate", "1e-4"], ["train.lr_rate", "did you mean train.lr?"]),
        (["--method", "qlorra"], ["'full', 'freeze', 'lora', 'qlora'"]),
        (["--method", "[qlora, full]"], ["'full', 'freeze', 'lora', 'qlora'"]),
        (["--train.precision", "fp16"], ["fp16", "CPU", "fp32 or bf16"]),
        (["--data.train", "missing.jsonl"], ["missing.jsonl"]),
        (["--lora.rank", "0"], ["LoRA rank must be positive"]),
        (["--resume", "nowhere"], ["--resume nowhere: not a checkpoint directory"]),
        (["--freeze.last_layers", "0", "--method", "freeze"], ["freeze.modules"]),
        (["--train.loss_chunk_tokens", "0"], ["train.loss_chunk_tokens must be >= 1"]),
        (["--train.save_every", "-1"], ["train.save_every must be >= 0"]),
        (["--data.max_length", "-5"], ["data.max_length must be at least 2"]),
        (["--data.num_proc", "0"], ["data.num_proc must be at least 1"]),
        (["--data.val", "nowhere.jsonl"], ["nowhere.jsonl", "check the path in data.val"]),
        (["--train.warmup", "1.5"], ["train.warmup 1.5 is neither a fraction"]),
        (["--output_dir", __file__], ["is a file; choose a directory"]),
        (["--lora.extra", "{use_dora: true}"], ["use_dora=True", "not supported"]),
        (["--lora.extra", "{r: 8}"], ["r (use lora.rank)"]),
        (["--lora.targets", "[qq_proj]"], ["unknown LoRA target(s) ['qq_proj']"]),
        (["--method", "freeze", "--freeze.modules", "[lm_headd]"], ["(similar: lm_head)"]),
        (["--method", "freeze", "--freeze.last_layers", "3"], ["the model has 2 layers"]),
    ],
)
def test_bad_input_fails_before_the_model_loads(capsys, recipe, no_model_load, flags, expected):
    line = fails(capsys, [str(recipe), *flags])
    for text in expected:
        assert text in line
    assert not (recipe.parent / "run").exists()


def test_torchrun_is_refused_until_multi_device_training(
    capsys, recipe, no_model_load, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets
    line = fails(capsys, [str(recipe)])
    assert "multi-process training is not supported yet (WORLD_SIZE=2" in line
    assert not (recipe.parent / "run").exists()


def test_qlora_where_nf4_is_unsupported(capsys, recipe, no_model_load, monkeypatch):
    monkeypatch.setitem(dev.CAPABILITIES, "qlora_nf4", frozenset({"cuda"}))
    line = fails(capsys, [str(recipe), "--method", "qlora"])
    assert "qlora_nf4 is not available on cpu" in line


def test_run_dir_policy(capsys, recipe, monkeypatch):
    """Another run: refused unless --overwrite; the same config resumes; foreign dirs refused."""
    run = recipe.parent / "run"
    succeeds(capsys, [str(recipe)])
    assert [p.name for p in list_checkpoints(run)] == ["step-1"]

    with monkeypatch.context() as m:
        m.setattr("tunelab.models.loading.load_model", _no_load)
        line = fails(capsys, [str(recipe), "--train.lr", "1e-3"])
        assert "holds another run" in line and "train.lr" in line and "--overwrite" in line
        line = fails(capsys, [str(recipe), "--train.lr", "1e-3", "--dry-run"])  # same verdict
        assert "holds another run" in line
        # A bad --overwrite command leaves the old run alone.
        fails(
            capsys, [str(recipe), "--train.lr", "1e-3", "--overwrite", "--train.precision", "fp16"]
        )
        assert list_checkpoints(run)
        foreign = recipe.parent / "foreign"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine")
        line = fails(capsys, [str(recipe), "--output_dir", str(foreign)])
        assert "holds no tunelab run" in line
        # --overwrite replaces runs only: a folder of the user's own files stays as it was
        line = fails(capsys, [str(recipe), "--output_dir", str(foreign), "--overwrite"])
        assert "holds no tunelab run" in line and (foreign / "notes.txt").read_text() == "mine"

    # Same config, longer: resume: auto continues from step 1.
    out = succeeds(capsys, [str(recipe), "--train.max_steps", "2"])
    assert "trained 2 steps" in out
    assert [r["step"] for r in read_rows(run) if "loss" in r] == [1, 2]
    out = succeeds(capsys, [str(recipe), "--train.max_steps", "2"])  # nothing left to do
    assert "no steps left to train (2 steps done" in out

    # --overwrite starts afresh with the new config.
    succeeds(capsys, [str(recipe), "--train.lr", "1e-3", "--overwrite"])
    assert [r["step"] for r in read_rows(run) if "loss" in r] == [1]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 1e-3


def test_the_same_recipe_resumes_from_another_working_directory(capsys, recipe, monkeypatch):
    """Data paths are stored absolute: `train sub/recipe.yaml` and, from sub/, `train
    recipe.yaml` are one run."""
    monkeypatch.chdir(recipe.parent.parent)
    succeeds(capsys, [f"{recipe.parent.name}/recipe.yaml"])
    monkeypatch.chdir(recipe.parent)
    assert "trained 2 steps" in succeeds(capsys, ["recipe.yaml", "--train.max_steps", "2"])


def test_data_paths_are_compared_when_the_checkpoint_has_no_fingerprint(capsys, recipe):
    """Checkpoints written before data fingerprints: the path decides, as it did then."""
    import json

    succeeds(capsys, [str(recipe)])
    state_file = recipe.parent / "run" / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["data_fingerprint"]
    state_file.write_text(json.dumps(state))
    other = write_chats(recipe.parent / "other.jsonl", 8, seed=5)
    line = fails(capsys, [str(recipe), "--data.train", str(other), "--train.max_steps", "2"])
    assert "holds another run" in line and "data.train" in line


def test_a_model_is_the_same_only_as_the_same_directory(tmp_path):
    from tunelab.train.setup import config_differences

    (tmp_path / "a" / "final").mkdir(parents=True)
    (tmp_path / "b" / "final").mkdir(parents=True)
    same = str(tmp_path / "a" / ".." / "a" / "final")
    assert config_differences({"model": str(tmp_path / "a/final")}, {"model": same}) == []
    assert config_differences({"model": str(tmp_path / "a/final")},
                              {"model": str(tmp_path / "b/final")}) == ["model"]  # fmt: skip
    assert config_differences({"model": "gone/final"}, {"model": str(tmp_path / "b/final")}) == [
        "model"
    ]


def test_an_explicit_resume_checks_the_checkpoint_run_and_the_output_dir(
    capsys, recipe, monkeypatch
):
    run = recipe.parent / "run"
    succeeds(capsys, [str(recipe), "--train.max_steps", "2", "--train.save_every", "1"])
    monkeypatch.setattr("tunelab.models.loading.load_model", _no_load)
    step1 = str(run / "checkpoints" / "step-1")
    line = fails(capsys, [str(recipe), "--resume", step1, "--lora.rank", "8"])
    assert "lora.rank" in line and "another config" in line
    other = recipe.parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    line = fails(capsys, [str(recipe), "--resume", step1, "--output_dir", str(other)])
    assert "holds no tunelab run" in line
    line = fails(capsys, [str(recipe), "--resume", str(run / "checkpoints" / "step-2"),
                          "--train.max_steps", "1"])  # fmt: skip
    assert "past this run's 1 steps" in line


def test_dry_run(capsys, recipe, no_model_load, monkeypatch):
    out = succeeds(capsys, [str(recipe), "--dry-run"])
    assert "# resolved config" in out
    assert "trainable parameters:" in out
    for row in ("weights", "gradients", "optimizer (AdamW)", "activations", "logits chunk"):
        assert row in out
    assert "fits: yes" in out
    assert not (recipe.parent / "run").exists()

    monkeypatch.setattr(dev, "mem_get_info", lambda device: (1 << 20, 2 << 20))
    line = fails(capsys, [str(recipe), "--dry-run"])
    assert "GiB" in line and "train.batch_size" in line


def test_examples_exist():
    assert EXAMPLES, "no recipes in examples/"


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(EXAMPLES_DIR)) for p in EXAMPLES])
def test_example_recipe(path, monkeypatch, no_model_load):
    """Every recipe parses; those whose model is here offline also pass --dry-run on CPU."""
    cfg = load_train_config(path, [])
    for sources in (cfg.data.train, cfg.data.val or []):
        for source in sources if isinstance(sources, list) else [sources]:
            source = Path(getattr(source, "path", source))
            assert any(source.parent.glob(source.name)), f"{source} is missing"
    if not model_available_offline(cfg.model):
        pytest.skip(f"{cfg.model} is not available offline")
    # Whether it fits this machine's RAM is not the question here.
    monkeypatch.setattr(dev, "mem_get_info", lambda device: (1 << 50, 1 << 50))
    out = io.StringIO()
    assert run_train(str(path), ["--train.device", "cpu"], dry_run=True, out=out) == 0
    assert "trainable parameters:" in out.getvalue()


def test_errors_are_tunelab_errors(recipe, no_model_load):
    """The Python API raises the same errors (the CLI turns them into exit code 2)."""
    with pytest.raises(TunelabError, match=r"did you mean train\.lr\?"):
        load_train_config(recipe, ["--train.lr_rate", "1"])
