"""Engine flags shared by `tunelab infer` and `tunelab serve`."""

from __future__ import annotations

import argparse
import json

import pytest

from tunelab.cli import main
from tunelab.engine import paged_attention
from tunelab.engine.flags import BACKENDS, add_engine_flags, engine_config
from tunelab.serve.commands import add_serve_flags


def parse(argv: list[str], add=add_engine_flags) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(argv)


def test_backend_choices_match_the_engine():
    assert BACKENDS == paged_attention.BACKENDS


def test_defaults_leave_every_choice_to_the_device():
    cfg = engine_config(parse([]))
    assert cfg.max_num_seqs is None and cfg.max_num_batched_tokens is None
    assert cfg.max_cache_tokens is None and cfg.cuda_graphs is None
    assert cfg.attention_backend == "auto" and cfg.enable_prefix_caching


def test_flags_map_onto_the_engine_config():
    argv = ["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--max-cache-tokens", "512"]
    argv += ["--attention-backend", "sdpa", "--cuda-graphs", "off", "--no-prefix-caching"]
    argv += ["--memory-fraction", "0.5"]
    cfg = engine_config(parse(argv))
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_cache_tokens) == (8, 64, 512)
    assert cfg.attention_backend == "sdpa" and cfg.cuda_graphs is False
    assert not cfg.enable_prefix_caching and cfg.memory_fraction == 0.5
    assert engine_config(parse(["--cuda-graphs", "on"])).cuda_graphs is True


def test_serve_takes_the_engine_flags():
    args = parse(["--max-num-seqs", "4", "--attention-backend", "sdpa"], add=add_serve_flags)
    cfg = engine_config(args)
    assert cfg.max_num_seqs == 4 and cfg.attention_backend == "sdpa"


def test_bad_backend_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--attention-backend", "flash"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_infer_runs_with_engine_flags_and_refuses_triton_on_cpu(make_tiny_model, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"id": "a", "prompt": "hello"}\n{"id": "b", "prompt": "hello there"}\n')
    base = ["infer", "--model", str(make_tiny_model("llama")), "--device", "cpu"]
    base += ["--input", str(src), "--output", str(out), "--temperature", "0", "--max-tokens", "3"]
    small = ["--max-num-seqs", "1", "--max-num-batched-tokens", "4", "--no-prefix-caching"]
    assert main(base + small) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a", "b"]
    assert all(r["completion_tokens"] == 3 for r in rows)

    out.unlink()
    assert main([*base, "--attention-backend", "triton"]) == 2
    err = capsys.readouterr().err
    assert "triton" in err and "sdpa" in err
