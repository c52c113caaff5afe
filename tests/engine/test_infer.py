"""``run_infer``: JSONL in, JSONL out, resumable after an interruption."""

from __future__ import annotations

import json

import pytest

from tunelab.engine.infer import read_records, run_infer
from tunelab.engine.llm_engine import EngineConfig
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError

PARAMS = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_infer_writes_every_record_and_resumes(make_tiny_model, tmp_path):
    model = str(make_tiny_model("llama"))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    records = [
        {"id": 1, "prompt": "hello world"},
        {"id": "b", "messages": [{"role": "user", "content": "The capital of France"}]},
        {"id": "c", "prompt": "tiny tokenizer"},
    ]
    write_jsonl(src, records)
    kwargs = dict(device="cpu", dtype="fp32", show_progress=False)
    cfg = EngineConfig(max_num_batched_tokens=16)
    assert run_infer(model, src, out, PARAMS, engine_config=cfg, **kwargs).written == 3
    full = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(full) == {1, "b", "c"}  # each id as the input gave it
    assert all(
        r["completion_tokens"] == 5 and r["finish_reason"] == "length" for r in full.values()
    )

    # An interrupted run: one result written, the next torn mid-line.
    first = json.dumps(full["b"]) + "\n"
    out.write_text(first + json.dumps(full["c"])[:20])
    assert run_infer(model, src, out, PARAMS, **kwargs).written == 2  # redoes 1 and torn "c"
    again = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert again == full
    assert run_infer(model, src, out, PARAMS, **kwargs).written == 0


def test_infer_rejects_bad_adapters_and_bad_lines(make_tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": 1, "prompt": "x"}])
    model = str(make_tiny_model("llama"))
    with pytest.raises(TunelabError, match=r"adapter 'adapter' \(some/adapter\).*does not exist"):
        run_infer(model, src, tmp_path / "o.jsonl", PARAMS, "cpu", adapter="some/adapter")
    for bad, message in [
        ({"prompt": "x"}, 'needs an "id"'),
        ({"id": 1, "prompt": "x", "messages": []}, "exactly one of"),
    ]:
        write_jsonl(src, [bad])
        with pytest.raises(TunelabError, match=message):
            read_records(src)
    write_jsonl(src, [{"id": 1, "prompt": "x"}, {"id": "1", "prompt": "y"}])
    with pytest.raises(TunelabError, match="appears twice"):
        read_records(src)


def test_resume_reads_outputs_holding_unicode_line_separators(make_tiny_model, tmp_path):
    """U+2028 / U+0085 are written raw (ensure_ascii=False); they are not line ends."""
    model = str(make_tiny_model("llama"))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": 1, "prompt": "x"}, {"id": 2, "prompt": "y"}])
    line = {"id": "1", "output": "a\u2028b\u0085c\u2029", "finish_reason": "length"}
    out.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    assert run_infer(model, src, out, PARAMS, "cpu", "fp32", show_progress=False).written == 1
    assert run_infer(model, src, out, PARAMS, "cpu", "fp32", show_progress=False).written == 0


def test_failed_requests_are_retried_by_the_next_run(make_tiny_model, tmp_path, capsys):
    """A run whose requests all fail (a cache too small) says so and exits 1; the same
    command with a big enough cache retries them, leaving one line per id."""
    from tunelab.cli import main

    src, out = tmp_path / "in.jsonl", tmp_path / "out" / "results.jsonl"  # parent made
    write_jsonl(src, [{"id": i, "prompt": "hello world " * 3} for i in range(3)])
    argv = ["infer", "--model", str(make_tiny_model("llama")), "--device", "cpu", "--input",
            str(src), "--output", str(out), "--temperature", "0", "--max-tokens", "2"]  # fmt: skip
    assert main([*argv, "--max-cache-tokens", "8"]) == 1
    assert "3 request(s) failed" in capsys.readouterr().err
    assert all("error" in json.loads(line) for line in out.read_text().splitlines())
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [0, 1, 2] and not any("error" in r for r in rows)


def test_the_input_file_is_not_an_output(make_tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": 1, "prompt": "x"}])
    with pytest.raises(TunelabError, match="is the input file"):
        run_infer(str(make_tiny_model("llama")), src, src, PARAMS, "cpu")
    with pytest.raises(TunelabError, match="is a directory"):
        run_infer(str(make_tiny_model("llama")), src, tmp_path, PARAMS, "cpu")


def test_a_foreign_line_in_the_output_is_a_clear_error(make_tiny_model, tmp_path):
    model = str(make_tiny_model("llama"))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"id": 1, "prompt": "x"}])
    out.write_text("not json\n" + json.dumps({"id": "1"}) + "\n")
    with pytest.raises(TunelabError, match=r"out.jsonl:1 is not a result line"):
        run_infer(model, src, out, PARAMS, "cpu", "fp32", show_progress=False)


def test_a_record_with_a_lone_surrogate_names_its_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": "bad \\ud800"}\n')
    with pytest.raises(TunelabError, match=r"in.jsonl:2 holds an invalid character"):
        read_records(src)


def test_infer_verb_through_the_cli(make_tiny_model, tmp_path, capsys):
    from tunelab.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "x", "prompt": "hello"}\n')
    out = tmp_path / "out.jsonl"
    argv = ["infer", "--model", str(make_tiny_model("llama")), "--device", "cpu"]
    argv += ["--input", str(src), "--output", str(out), "--temperature", "0", "--max-tokens", "3"]
    assert main(argv) == 0
    assert '"id": "x"' in out.read_text()
    assert f"wrote 1 new result(s) to {out}" in capsys.readouterr().out
    assert main(argv) == 0  # again: nothing left to do, and it says so
    assert f"wrote 0 new result(s) to {out}" in capsys.readouterr().out
