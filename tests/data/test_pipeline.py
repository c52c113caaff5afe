"""prepare(): fingerprinted cache, deterministic split and shuffle, counts, limits, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunelab.data import pipeline
from tunelab.data.config import DataConfig, DataSource
from tunelab.data.conversation import Conversation, Turn
from tunelab.data.packing import pack_greedy, packing_efficiency
from tunelab.data.pipeline import conversation_from_json, conversation_to_json, prepare
from tunelab.data.templates import IGNORE_INDEX
from tunelab.errors import TunelabError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from tunelab.models.loading import load_tokenizer

    return load_tokenizer(tiny_tokenizer)


def chat(question: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct short conversations (the answer names the example's number)."""
    return [
        chat(f"What is {i} plus {i}?", f"It is {2 * i}, example {i}.")
        for i in range(start, start + n)
    ]


def write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cfg(tmp_path: Path, train: Path, cache: str = "cache", **options: Any) -> DataConfig:
    return DataConfig(train=str(train), cache_dir=str(tmp_path / cache), **options)


def ids(dataset) -> list[list[int]]:
    return [list(x) for x in dataset["input_ids"]]


def no_encoding(monkeypatch) -> None:
    """Make any tokenization fail: a cache hit must not encode again."""

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(pipeline, "_encode_all", boom)


# ---- cache ----------------------------------------------------------------------------------


def test_second_prepare_hits_cache_without_tokenizing(tmp_path, tok, monkeypatch):
    train = write(tmp_path / "train.jsonl", rows(12))
    first = prepare(cfg(tmp_path, train, split=0.25), tok)
    assert not first.stats.cache_hit
    no_encoding(monkeypatch)
    second = prepare(cfg(tmp_path, train, split=0.25), tok)
    assert second.stats.cache_hit
    assert second.stats.cache_path == first.stats.cache_path
    assert ids(second.train) == ids(first.train) and ids(second.val) == ids(first.val)
    assert second.stats.tokens == first.stats.tokens
    assert second.stats.trained_tokens == first.stats.trained_tokens


def test_changed_file_misses_cache(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(6))
    first = prepare(cfg(tmp_path, train), tok)
    write(train, [*rows(6)[:-1], chat("What is new?", "Something new.")])
    second = prepare(cfg(tmp_path, train), tok)
    assert not second.stats.cache_hit
    assert second.stats.cache_path != first.stats.cache_path
    assert any("new" in tok.decode(x) for x in ids(second.train))


@pytest.mark.parametrize(
    "option", [{"max_length": 1024}, {"template": "chatml"}, {"train_on_prompt": True}]
)
def test_changed_option_misses_cache(tmp_path, tok, option):
    train = write(tmp_path / "train.jsonl", rows(6))
    first = prepare(cfg(tmp_path, train), tok)
    second = prepare(cfg(tmp_path, train, **option), tok)
    assert not second.stats.cache_hit
    assert second.stats.cache_path != first.stats.cache_path


@pytest.mark.parametrize("option", [{"num_proc": 2}, {"packing": True}])
def test_options_that_do_not_change_tokens_hit_cache(tmp_path, tok, monkeypatch, option):
    train = write(tmp_path / "train.jsonl", rows(6))
    prepare(cfg(tmp_path, train), tok)
    no_encoding(monkeypatch)
    assert prepare(cfg(tmp_path, train, **option), tok).stats.cache_hit


def test_same_file_through_another_path_hits_cache(tmp_path, tok, monkeypatch):
    (tmp_path / "sub").mkdir()
    train = write(tmp_path / "train.jsonl", rows(6))
    prepare(cfg(tmp_path, train), tok)
    no_encoding(monkeypatch)
    monkeypatch.chdir(tmp_path / "sub")
    assert prepare(cfg(tmp_path, Path("../train.jsonl")), tok).stats.cache_hit


def test_weighted_sources_are_part_of_the_key(tmp_path, tok):
    for name, start in (("a", 0), ("b", 3), ("c", 6)):
        write(tmp_path / f"{name}.jsonl", rows(3, start=start))

    def run(first: str, second: str):
        sources = [DataSource(str(tmp_path / first), weight=2.0), str(tmp_path / second)]
        return prepare(DataConfig(train=sources, cache_dir=str(tmp_path / "cache")), tok)

    assert run("[ab].jsonl", "c.jsonl").stats.examples_read == 15  # (a + b) * 2 + c
    # The same files in the same order, cut into sources differently: other data.
    again = run("a.jsonl", "[bc].jsonl")
    assert not again.stats.cache_hit and again.stats.examples_read == 12  # a * 2 + b + c


def test_on_error_fail_is_not_bypassed_by_a_cache_made_with_skip(tmp_path, tok):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows(3)) + "\n{bad json\n")
    assert len(prepare(cfg(tmp_path, train, on_error="skip"), tok).stats.skipped) == 1
    with pytest.raises(TunelabError, match=r"train\.jsonl:4"):
        prepare(cfg(tmp_path, train, on_error="fail"), tok)


# ---- split, shuffle, limits -----------------------------------------------------------------


def test_split_is_deterministic_and_seeded(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(40))
    a = prepare(cfg(tmp_path, train, "a", split=0.1), tok)
    b = prepare(cfg(tmp_path, train, "b", split=0.1), tok)  # a fresh cache: computed again
    c = prepare(cfg(tmp_path, train, "c", split=0.1, seed=7), tok)
    assert not b.stats.cache_hit
    assert len(a.val) == 4 and len(a.train) == 36
    assert ids(a.val) == ids(b.val) and ids(a.train) == ids(b.train)
    assert ids(c.val) != ids(a.val)
    everything = sorted(map(tuple, ids(a.train) + ids(a.val)))
    assert everything == sorted(map(tuple, ids(c.train) + ids(c.val)))  # a partition
    assert len(set(everything)) == 40


def test_split_of_a_weighted_source_never_puts_an_example_on_both_sides(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(40))
    source = {"path": str(train), "weight": 2.5}  # each example twice, half of them thrice
    data = prepare(DataConfig(train=[source], cache_dir=str(tmp_path / "cache"), split=0.2), tok)
    val, train_rows = set(map(tuple, ids(data.val))), list(map(tuple, ids(data.train)))
    assert len(val) == len(data.val) == 8  # 20% of the 40 distinct examples, once each
    assert not val & set(train_rows)
    assert len(set(train_rows)) == 32 and len(train_rows) > 64  # the rest, weighted


def test_fingerprint_takes_mixed_and_typed_role_tag_keys(tmp_path, tok):
    from tunelab.data.pipeline import fingerprint

    train = write(tmp_path / "train.jsonl", rows(4))
    template = "{{ messages }}"
    mixed = fingerprint(
        cfg(tmp_path, train, role_tags={0: "user", "gpt": "assistant"}), tok, template
    )
    as_int = fingerprint(cfg(tmp_path, train, role_tags={0: "user"}), tok, template)
    as_str = fingerprint(cfg(tmp_path, train, role_tags={"0": "user"}), tok, template)
    assert len({mixed, as_int, as_str}) == 3  # {0: ...} and {"0": ...} match different data


def test_split_without_shuffle_keeps_file_order(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(20))
    data = prepare(cfg(tmp_path, train, split=0.2, shuffle=False), tok)
    numbers = [int(tok.decode(x).split("example ")[1].split(".")[0]) for x in ids(data.train)]
    assert numbers == sorted(numbers) and len(numbers) == 16


def test_explicit_val_file(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(10))
    val = write(tmp_path / "val.jsonl", rows(3, start=100))
    data = prepare(cfg(tmp_path, train, val=str(val), split=0.5), tok)  # val wins over split
    assert (len(data.train), len(data.val)) == (10, 3)
    assert (data.stats.train_examples, data.stats.val_examples, data.stats.examples_read) == (
        10,
        3,
        13,
    )
    assert all("example 10" in tok.decode(x) for x in ids(data.val))  # 100, 101, 102
    # the val file is part of the fingerprint too
    write(val, rows(3, start=200))
    assert not prepare(cfg(tmp_path, train, val=str(val), split=0.5), tok).stats.cache_hit


def test_shuffle_is_seeded(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(20))
    plain = ids(prepare(cfg(tmp_path, train, "p", shuffle=False), tok).train)
    assert plain == [list(tok.apply_chat_template(r["messages"])["input_ids"]) for r in rows(20)]
    one = ids(prepare(cfg(tmp_path, train, "s1", seed=1), tok).train)
    again = ids(prepare(cfg(tmp_path, train, "s1b", seed=1), tok).train)
    other = ids(prepare(cfg(tmp_path, train, "s2", seed=2), tok).train)
    assert one == again
    assert one != plain and other != one
    assert sorted(one) == sorted(plain) == sorted(other)


def test_num_proc_2_gives_the_same_rows(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", [*rows(16), chat("a " * 80, "short")])
    one = prepare(cfg(tmp_path, train, "one", max_length=56, split=0.25), tok)
    two = prepare(cfg(tmp_path, train, "two", max_length=56, split=0.25, num_proc=2), tok)
    assert ids(one.train) == ids(two.train) and ids(one.val) == ids(two.val)
    assert one.train["labels"] == two.train["labels"]
    assert one.stats.dropped_no_target == two.stats.dropped_no_target == 1


def test_max_samples_and_max_val_samples(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(30))
    full = prepare(cfg(tmp_path, train, "full", split=0.2), tok)
    cut = prepare(cfg(tmp_path, train, "cut", split=0.2, max_samples=5, max_val_samples=2), tok)
    assert (len(cut.train), len(cut.val)) == (5, 2)
    assert (cut.stats.train_examples, cut.stats.val_examples) == (5, 2)
    assert ids(cut.train) == ids(full.train)[:5]  # the first after shuffling
    assert ids(cut.val) == ids(full.val)[:2]  # the split does not depend on max_samples
    assert cut.stats.tokens == sum(cut.train["length"])
    big = prepare(cfg(tmp_path, train, "big", split=0.2, max_samples=1000), tok)
    assert len(big.train) == 24


# ---- truncation and drops -------------------------------------------------------------------


def long_and_short(tmp_path: Path) -> Path:
    """4 short examples (< 50 tokens) and 3 whose long answer passes 56 tokens."""
    long = [chat(f"Tell me {i}.", "the capital of France is Paris " * 10) for i in range(3)]
    return write(tmp_path / "train.jsonl", rows(4) + long)


def test_truncate_keeps_the_start_and_counts(tmp_path, tok):
    train = long_and_short(tmp_path)
    data = prepare(cfg(tmp_path, train, max_length=56, truncation="truncate"), tok)
    s = data.stats
    assert (s.truncated, s.dropped_too_long, s.dropped_no_target) == (3, 0, 0)
    assert s.train_examples == 7 and max(data.train["length"]) == 56
    assert all(len(x) <= 56 for x in ids(data.train))


def test_drop_removes_long_examples_and_counts(tmp_path, tok):
    train = long_and_short(tmp_path)
    data = prepare(cfg(tmp_path, train, max_length=56, truncation="drop"), tok)
    s = data.stats
    assert (s.truncated, s.dropped_too_long, s.dropped_no_target) == (0, 3, 0)
    assert s.train_examples == 4 and s.examples_read == 7


def test_answer_truncated_away_is_dropped_as_no_target(tmp_path, tok):
    long_prompt = [chat("the capital of France is Paris " * 8, f"yes {i}") for i in range(2)]
    train = write(tmp_path / "train.jsonl", rows(3) + long_prompt)
    s = prepare(cfg(tmp_path, train, max_length=56), tok).stats
    assert (s.dropped_no_target, s.truncated, s.train_examples) == (2, 0, 3)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_batch_or_worker_shard_of_only_dropped_examples(tmp_path, tok, num_proc):
    dropped = [chat("the capital of France is Paris " * 8, f"yes {i}") for i in range(260)]
    train = write(tmp_path / "train.jsonl", [*dropped, *rows(6)])
    options = {"max_length": 56, "num_proc": num_proc, "shuffle": False}
    data = prepare(cfg(tmp_path, train, **options), tok)
    assert (data.stats.dropped_no_target, data.stats.train_examples) == (260, 6)
    assert ids(data.train)[0] == list(tok.apply_chat_template(rows(1)[0]["messages"])["input_ids"])


def test_turns_marked_untrained_are_dropped_as_no_target(tmp_path, tok):
    untrained = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 0},
        ]
    }
    train = write(tmp_path / "train.jsonl", [*rows(2), untrained])
    s = prepare(cfg(tmp_path, train), tok).stats
    assert (s.dropped_no_target, s.train_examples) == (1, 2)


# ---- stats ----------------------------------------------------------------------------------


def test_stats_values(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", rows(10))
    data = prepare(cfg(tmp_path, train, max_length=64, split=0.2), tok)
    s = data.stats
    lengths = data.train["length"]
    assert lengths == [len(x) for x in ids(data.train)]
    assert s.tokens == sum(lengths)
    trained = sum(1 for row in data.train["labels"] for x in row if x != IGNORE_INDEX)
    assert 0 < s.trained_tokens == trained < s.tokens
    assert 0 < s.packing_efficiency <= 1
    bins = pack_greedy(lengths, 64)
    assert s.packing_efficiency == pytest.approx(packing_efficiency(lengths, bins, 64))
    assert (s.examples_read, s.train_examples, s.val_examples, s.skipped) == (10, 8, 2, [])
    assert set(data.train.column_names) == {"input_ids", "labels", "length"}
    for x, y in zip(ids(data.train), data.train["labels"], strict=True):
        assert [t for t, lab in zip(x, y, strict=True) if lab != IGNORE_INDEX] == [
            lab for lab in y if lab != IGNORE_INDEX
        ]


def test_conversation_json_round_trip():
    conv = Conversation(
        turns=[Turn("system", "Sé brief"), Turn("user", "Hi", train=True), Turn("assistant", "Yo")],
        tools=[{"name": "f"}],
        images=["a.png"],
        label="x",
        source="f.jsonl:3",
    )
    assert conversation_from_json(conversation_to_json(conv)) == conv


# ---- errors ---------------------------------------------------------------------------------


def test_empty_file_is_an_error(tmp_path, tok):
    train = tmp_path / "train.jsonl"
    train.write_text("\n")
    with pytest.raises(TunelabError, match="no examples"):
        prepare(cfg(tmp_path, train), tok)


def test_no_train_is_an_error(tmp_path, tok):
    with pytest.raises(TunelabError, match=r"data\.train is empty"):
        prepare(DataConfig(cache_dir=str(tmp_path)), tok)


def test_everything_dropped_is_an_error_even_with_a_split(tmp_path, tok):
    train = long_and_short(tmp_path)
    with pytest.raises(TunelabError, match="no training examples left"):
        prepare(cfg(tmp_path, train, max_length=4, truncation="drop", split=0.1), tok)
