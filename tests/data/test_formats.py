"""Readers: every format in every file type, bad input, weights, the bundled example data."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tunelab.data.config import DataConfig, DataSource
from tunelab.data.formats import detect_format, expand_paths, read_sources
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "data"
PAPER_LABELS = ["cs.CL", "cs.CV", "cs.LG", "q-bio", "astro-ph", "econ"]
FILE_TYPES = ["json", "jsonl", "csv", "parquet", "datasets"]


def write(path: Path, rows: list[dict[str, Any]], kind: str | None = None) -> Path:
    """Write ``rows`` as ``kind`` (default: the suffix); CSV cells hold lists as JSON."""
    kind = kind or path.suffix.lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), "utf-8")
    elif kind == "csv":
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", encoding="utf-8", newline="") as f:
            out = csv.DictWriter(f, cols)
            out.writeheader()
            for r in rows:
                out.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def read(path: Path | str, **options: Any):
    return read_sources(str(path), DataConfig(**options))


def messages(result) -> list[list[dict[str, str]]]:
    return [c.to_messages() for c in result.conversations]


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


# ---- round trips: each format in each file type -------------------------------------------

ROUND_TRIPS = {
    "alpaca": (
        [
            {
                "instruction": "Traduis en chinois",
                "input": "bonjour ☕",
                "output": "你好",
                "system": "Sé bref.",
                "history": [["hi", "hello"]],
            },
            {"instruction": "Say hi", "input": "", "output": "Hi!", "system": "", "history": []},
        ],
        [
            [s("Sé bref."), u("hi"), a("hello"), u("Traduis en chinois\n\nbonjour ☕"), a("你好")],
            [u("Say hi"), a("Hi!")],
        ],
    ),
    "sharegpt": (
        [
            {
                "system": "Be kind.",
                "conversations": [
                    {"from": "human", "value": "1+1?"},
                    {"from": "gpt", "value": "2"},
                    {"from": "human", "value": "ça va?"},
                    {"from": "gpt", "value": "oui"},
                ],
            },
            {
                "system": "",
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "user", "value": "q"},
                    {"from": "assistant", "value": "r"},
                ],
            },
        ],
        [[s("Be kind."), u("1+1?"), a("2"), u("ça va?"), a("oui")], [s("S"), u("q"), a("r")]],
    ),
    "messages": (
        [
            {"messages": [s("sys"), u("日本の首都は？"), a("東京です。"), u("thanks"), a("😀")]},
            {"messages": [u("q"), a("r")]},
        ],
        [[s("sys"), u("日本の首都は？"), a("東京です。"), u("thanks"), a("😀")], [u("q"), a("r")]],
    ),
    "preference": (
        [{"prompt": "Best fruit?", "chosen": "Mango 🥭", "rejected": "Rocks"}],
        [[u("Best fruit?"), a("Mango 🥭")]],
    ),
    "classification": (
        [{"title": "Étoiles", "abstract": "Spectra of stars.", "label": "astro-ph"}],
        [
            [
                u(
                    "Classify the paper into one of: cs.CL, astro-ph.\n\nTitle: Étoiles\n"
                    "Abstract: Spectra of stars.\n\nCategory:"
                ),
                a("astro-ph"),
            ]
        ],
    ),
}


@pytest.mark.parametrize("kind", FILE_TYPES)
@pytest.mark.parametrize("fmt", sorted(ROUND_TRIPS))
def test_round_trip(tmp_path: Path, fmt: str, kind: str) -> None:
    rows, expected = ROUND_TRIPS[fmt]
    path = write(tmp_path / (f"d.{kind}" if kind != "datasets" else "ds"), rows, kind)
    result = read(path, label_set=["cs.CL", "astro-ph"])
    assert messages(result) == expected
    assert result.skipped == []
    assert result.files and all(f.is_file() for f in result.files)
    first = result.conversations[0]
    assert first.source == (f"{path}:1" if kind == "jsonl" else f"{path}:row 1")
    if fmt == "preference":
        assert first.rejected == "Rocks"
    if fmt == "classification":
        assert first.label == "astro-ph"


@pytest.mark.parametrize("kind", FILE_TYPES)
def test_text_and_multimodal_round_trip(tmp_path: Path, kind: str) -> None:
    name = "{}" if kind == "datasets" else "{}." + kind
    path = write(tmp_path / name.format("t"), [{"text": "naïve ✓"}], kind)
    assert [c.text for c in read(path).conversations] == ["naïve ✓"]
    rows = [{"messages": [u("<image>What is this?"), a("A cat.")], "images": ["img/cat.png"]}]
    path = write(tmp_path / name.format("m"), rows, kind)
    image = (path if path.is_dir() else path.parent) / "img" / "cat.png"  # relative to the data
    image.parent.mkdir()
    image.write_bytes(b"png")
    conv = read(path).conversations[0]
    assert conv.to_messages() == [u("<image>What is this?"), a("A cat.")]
    assert conv.images == [str(image)]


def test_csv_empty_cells_and_datasets_dict(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output,system,history\nQ,,A,,\n", encoding="utf-8")
    assert messages(read(path)) == [[u("Q"), a("A")]]
    import datasets

    ds = datasets.Dataset.from_list([{"text": "train row"}])
    other = datasets.Dataset.from_list([{"text": "test row"}])
    datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(str(tmp_path / "dd"))
    assert [c.text for c in read(tmp_path / "dd").conversations] == ["train row"]
    datasets.DatasetDict({"test": other}).save_to_disk(str(tmp_path / "one"))
    assert [c.text for c in read(tmp_path / "one").conversations] == ["test row"]
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    labelled = datasets.Dataset.from_list([{"text": "great", "label": 1}], features=features)
    labelled.save_to_disk(str(tmp_path / "labels"))
    assert read(tmp_path / "labels").conversations[0].label == "pos"  # ClassLabel -> name
    assert expand_paths(str(tmp_path / "*")) == [
        tmp_path / n for n in ("a.csv", "dd", "labels", "one")
    ]
    datasets.DatasetDict({"a": ds, "b": other}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(TunelabError, match="none is 'train'"):
        read(tmp_path / "two")


# ---- options ------------------------------------------------------------------------------


def test_system_option_fills_only_missing(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.jsonl",
        [{"messages": [u("q"), a("r")]}, {"messages": [s("own"), u("q"), a("r")]}],
    )
    assert messages(read(path, system="default")) == [
        [s("default"), u("q"), a("r")],
        [s("own"), u("q"), a("r")],
    ]


def test_column_map(tmp_path: Path) -> None:
    rows = [{"question": "Q", "answer": "A", "context": "C"}]
    path = write(tmp_path / "a.jsonl", rows)
    cols = {"instruction": "question", "output": "answer", "input": "context"}
    assert messages(read(path, columns=cols)) == [[u("Q\n\nC"), a("A")]]
    path = write(tmp_path / "m.jsonl", [{"dialog": [u("q"), a("r")]}])
    assert messages(read(path, columns={"messages": "dialog"})) == [[u("q"), a("r")]]
    path = write(tmp_path / "c.jsonl", [{"review": "Great!", "stars": "5"}])
    result = read(path, columns={"label": "stars"}, prompt="Review: {review}\nStars:")
    assert messages(result) == [[u("Review: Great!\nStars:"), a("5")]]


def test_role_tags_and_tool_turns(tmp_path: Path) -> None:
    conv = [
        {"from": "person", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "weather"}'},
        {"from": "observation", "value": "sunny"},
        {"from": "bot", "value": "It is sunny."},
    ]
    path = write(tmp_path / "s.jsonl", [{"conversations": conv}])
    result = read(path, role_tags={"person": "user", "bot": "assistant"})
    assert [t.role for t in result.conversations[0].turns] == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    with pytest.raises(TunelabError, match=r"unknown role 'person'.*data.role_tags"):
        read(path)


def test_content_parts_and_train_flags(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    msgs = [
        u("q"),
        {"role": "assistant", "content": "old", "weight": 0},
        u("q2"),
        {"role": "assistant", "content": parts},
    ]
    conv = read(write(tmp_path / "m.jsonl", [{"messages": msgs}])).conversations[0]
    assert conv.turns[-1].content == "one\ntwo"
    assert [t.train for t in conv.turns] == [None, False, None, None]
    image = [u([{"type": "image", "image": "x.png"}, {"type": "text", "text": "?"}]), a("r")]
    with pytest.raises(TunelabError, match="image part; use format multimodal"):
        read(write(tmp_path / "i.jsonl", [{"messages": image}]))
    (tmp_path / "x.png").write_bytes(b"png")
    conv = read(tmp_path / "i.jsonl", format="multimodal").conversations[0]
    assert conv.turns[0].content == "<image>\n?"
    assert conv.images == [str(tmp_path / "x.png")]


def test_preference_conversational(tmp_path: Path) -> None:
    row = {"chosen": [u("q"), a("good")], "rejected": [u("q"), a("bad")]}
    conv = read(write(tmp_path / "p.jsonl", [row])).conversations[0]
    assert conv.to_messages() == [u("q"), a("good")]
    assert conv.rejected == "bad"


def test_mixing_weights(tmp_path: Path) -> None:
    small = write(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(3)])
    big = write(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    cfg = DataConfig()
    twice = read_sources([DataSource(str(small), weight=2.0), str(big)], cfg)
    texts = [c.text for c in twice.conversations]
    assert texts[:6] == ["a0", "a1", "a2"] * 2 and texts[6:] == [f"b{i}" for i in range(10)]

    def half(seed: int) -> list[str | None]:
        result = read_sources([DataSource(str(big), weight=0.5)], DataConfig(seed=seed))
        return [c.text for c in result.conversations]

    assert len(half(1)) == 5 and half(1) == half(1)
    assert len(set(half(1))) == 5 and half(1) == sorted(half(1), key=lambda t: int(t[1:]))
    assert any(half(seed) != half(1) for seed in range(2, 6))
    assert len(read_sources(DataSource(str(big), weight=1.5), cfg).conversations) == 15
    as_dict = read_sources([{"path": str(small), "weight": 3}], cfg)  # type: ignore[list-item]
    assert len(as_dict.conversations) == 9
    with pytest.raises(TunelabError, match="weight 0"):
        read_sources([DataSource(str(big), weight=0)], cfg)


def test_paths_globs_and_directories(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.json", "notes.txt"):
        (tmp_path / name).write_text(
            '[{"text": "x"}]' if name.endswith("json") else '{"text": "y"}\n'
        )
    assert expand_paths(str(tmp_path)) == [tmp_path / "a.json", tmp_path / "b.jsonl"]
    assert expand_paths(str(tmp_path / "*.json*")) == [tmp_path / "a.json", tmp_path / "b.jsonl"]
    assert len(read(tmp_path).conversations) == 2
    with pytest.raises(TunelabError, match=r"no data files match '.*nothing"):
        expand_paths(str(tmp_path / "nothing*.jsonl"))
    with pytest.raises(TunelabError, match="does not exist"):
        expand_paths(str(tmp_path / "missing.jsonl"))
    with pytest.raises(TunelabError, match=r"unsupported type '.txt'"):
        expand_paths(str(tmp_path / "notes.txt"))


def test_detect_format(tmp_path: Path) -> None:
    assert detect_format({"instruction", "input", "output"}) == "alpaca"
    assert detect_format({"conversations", "system"}) == "sharegpt"
    assert detect_format({"messages"}) == "messages"
    assert detect_format({"messages", "images"}) == "multimodal"
    assert detect_format({"prompt", "chosen", "rejected"}) == "preference"
    assert detect_format({"title", "abstract", "label"}) == "classification"
    assert detect_format({"text", "label"}) == "classification"
    assert detect_format({"text", "meta"}) == "text"
    path = write(tmp_path / "t.jsonl", [{"text": "x", "label": "y"}])
    assert read(path).conversations[0].label == "y"  # auto: classification
    assert read_sources(DataSource(str(path), format="text"), DataConfig()).conversations[0].text
    with pytest.raises(
        TunelabError,
        match=r"\['answer', 'question'\] fit no data format.*alpaca: instruction, output",
    ):
        detect_format({"question", "answer"})


# ---- bad input: on_error fail (the message) and skip (counted with the reason) -------------

GOOD = {"messages": [u("q"), a("r")]}
BAD_ROWS = {
    "missing field": (
        {"instruction": "q"},
        "alpaca",
        r"missing required field 'output' for format alpaca",
    ),
    "not alternating": (
        {"messages": [u("q"), u("q2"), a("r")]},
        None,
        r"roles do not alternate: turn 2 is user after a user turn",
    ),
    "system in the middle": (
        {"messages": [u("q"), a("r"), s("s"), u("q"), a("r")]},
        None,
        "turn 3 is a system turn; a system turn is only allowed first",
    ),
    "tool after user": (
        {"messages": [u("q"), {"role": "tool", "content": "x"}, a("r")]},
        None,
        "roles do not alternate: turn 2 is tool after a user turn",
    ),
    "ends with user": (
        {"messages": [u("q"), a("r"), u("q2")]},
        None,
        "the conversation ends with a user turn",
    ),
    "unknown role": (
        {"messages": [{"role": "robot", "content": "q"}, a("r")]},
        None,
        r"unknown role 'robot' in turn 1",
    ),
    "role not text": (
        {"messages": [{"role": ["user"], "content": "q"}, a("r")]},
        None,
        r"unknown role \['user'\] in turn 1",
    ),
    "no text fields": (
        {"label": "cs.CL"},
        "classification",
        r"classification example without title/abstract or text fields",
    ),
    "empty answer": ({"messages": [u("q"), a("  ")]}, None, "the final assistant turn is empty"),
    "missing image": (
        {"messages": [u("<image>q"), a("r")], "images": ["gone.png"]},
        "multimodal",
        r"image file not found: 'gone.png' \(looked for .*gone.png\)",
    ),
    "image count": (
        {"messages": [u("<image><image>q"), a("r")], "images": []},
        "multimodal",
        "the messages hold 2 <image> placeholders but 0 images",
    ),
    "unknown label": (
        {"title": "t", "abstract": "x", "label": "cs.XX"},
        "classification",
        r"label 'cs.XX' is not in data.label_set",
    ),
    "prompt field": (
        {"title": "t", "label": "cs.CL"},
        "classification",
        r"missing field 'abstract' used by the classification prompt",
    ),
    "empty text": ({"text": " "}, "text", "the text is empty"),
    "not a list": ({"messages": "hello"}, None, "messages is not a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_example(tmp_path: Path, case: str) -> None:
    row, fmt, message = BAD_ROWS[case]
    good = {"alpaca": {"instruction": "q", "output": "r"}, "text": {"text": "t"}}.get(fmt, GOOD)
    if fmt == "classification":
        good = {"title": "t", "abstract": "x", "label": "cs.CL"}
    if fmt == "multimodal":
        good = {**GOOD, "images": []}
    path = write(tmp_path / "d.jsonl", [good, row, good])
    options = {"format": fmt or "auto", "label_set": PAPER_LABELS}
    with pytest.raises(TunelabError, match=rf"d.jsonl:2: {message}.*data.on_error: skip"):
        read(path, **options)
    result = read(path, on_error="skip", **options)
    assert len(result.conversations) == 2
    assert len(result.skipped) == 1 and result.skipped[0].source == f"{path}:2"
    assert re.search(message, result.skipped[0].reason)


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n\n[1, 2]\n{"text": "ok"}\n')
    with pytest.raises(TunelabError, match=r"d.jsonl:2: malformed JSON line: Unterminated string"):
        read(path)
    result = read(path, on_error="skip")
    assert [c.text for c in result.conversations] == ["ok", "ok"]
    assert [(x.source, x.reason[:20]) for x in result.skipped] == [
        (f"{path}:2", "malformed JSON line:"),
        (f"{path}:4", "expected a JSON obje"),
    ]
    single = tmp_path / "one.json"
    single.write_text('{\n  "text": "pretty"\n}\n')
    assert [c.text for c in read(single).conversations] == ["pretty"]
    whole = tmp_path / "d.json"
    whole.write_text('[{"text": "ok"},\n {"text": }]')
    with pytest.raises(TunelabError, match=r"d.json:2: the file is not valid JSON"):
        read(whole, on_error="skip")


def test_config_errors_always_raise(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [{"question": "q", "answer": "r"}])
    with pytest.raises(
        TunelabError, match=r"d.jsonl: the columns \['answer', 'question'\] fit no data format"
    ):
        read(path, on_error="skip")
    with pytest.raises(TunelabError, match="unknown data format 'chatml'; use one of auto, alpaca"):
        read(path, format="chatml")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TunelabError, match=r"no examples in '.*empty.jsonl'"):
        read(tmp_path / "empty.jsonl")
    bad = write(tmp_path / "bad.jsonl", [{"text": ""}])
    with pytest.raises(
        TunelabError,
        match=r"no examples in .* \(1 skipped, e.g. .*bad.jsonl:1: the text is empty\)",
    ):
        read(bad, on_error="skip")
    with pytest.raises(TunelabError, match=r"uses \{labels\} but data.label_set is not set"):
        read(write(tmp_path / "c.jsonl", [{"t": "x", "label": "y"}]), prompt="{labels}: {t}")
    with pytest.raises(TunelabError, match=r"set data.prompt"):
        read(tmp_path / "c.jsonl")


# ---- the bundled example data -------------------------------------------------------------


def test_bundled_examples_read_cleanly() -> None:
    papers = read(EXAMPLES / "papers" / "*.jsonl", label_set=PAPER_LABELS)
    assert len(papers.conversations) == 3600 and not papers.skipped
    assert {c.label for c in papers.conversations} == set(PAPER_LABELS)
    prompt = papers.conversations[0].turns[0].content
    assert prompt.startswith(f"Classify the paper into one of: {', '.join(PAPER_LABELS)}.")
    alpaca = read(EXAMPLES / "instruct" / "alpaca.jsonl")
    sharegpt = read(EXAMPLES / "instruct" / "sharegpt.jsonl")
    assert (len(alpaca.conversations), len(sharegpt.conversations)) == (300, 200)
    assert not alpaca.skipped and not sharegpt.skipped
    assert all(c.system for c in sharegpt.conversations)
    assert any(len(c.turns) > 3 for c in alpaca.conversations)
    assert any(not c.turns[-2].content.isascii() for c in alpaca.conversations)
    sizes = sum(p.stat().st_size for p in EXAMPLES.rglob("*.jsonl"))
    assert sizes < 3_000_000


def test_generator_is_deterministic_and_matches_the_bundled_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = module.write_all(tmp_path / "one")
    second = module.write_all(tmp_path / "two")
    for one, two in zip(first, second, strict=True):
        relative = one.relative_to(tmp_path / "one")
        assert one.read_bytes() == two.read_bytes() == (EXAMPLES / relative).read_bytes()
