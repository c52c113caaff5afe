"""Parsers: one raw record (a dict) -> one ``Conversation``, per data format.

A parser raises ``BadExample`` for an invalid example; the reader (``formats.py``) turns it
into an error or a skip according to ``data.on_error``. Field names are ours, looked up
through ``data.columns``.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.config import DataConfig
from tunelab.data.conversation import ROLES, Conversation, Turn
from tunelab.errors import TunelabError

SHAREGPT_TAGS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    # A function call is the assistant's move; observations are tool output.
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
PAPER_PROMPT = "Title: {title}\nAbstract: {abstract}\n\nCategory:"
TEXT_PROMPT = "Text: {text}\n\nCategory:"
IMAGE = "<image>"
_NEXT = {
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


class BadExample(Exception):
    """One example is invalid; the reader skips it or fails, per ``data.on_error``."""


@dataclass
class Ctx:
    """What parsing one file's records needs."""

    cfg: DataConfig
    fmt: str
    base_dir: Path  # relative image paths resolve against the data file's directory
    tags: dict[str, str]  # role tag in the file -> our role

    @classmethod
    def create(cls, cfg: DataConfig, fmt: str, base_dir: Path) -> Ctx:
        tags = dict(SHAREGPT_TAGS) if fmt == "sharegpt" else {r: r for r in ROLES}
        return cls(cfg, fmt, base_dir, tags | cfg.role_tags)


def parse(rec: dict[str, Any], ctx: Ctx) -> Conversation:
    """One record -> a checked ``Conversation``; raises ``BadExample`` when it is invalid."""
    conv = PARSERS[ctx.fmt](rec, ctx)
    if conv.text is None:
        _finish_turns(conv, ctx)
    return conv


# ---- fields -------------------------------------------------------------------------------


def _get(rec: dict[str, Any], name: str, ctx: Ctx) -> Any:
    """Our field ``name`` through the column map; ``None`` when absent or null."""
    return rec.get(ctx.cfg.columns.get(name, name))


def _require(rec: dict[str, Any], name: str, ctx: Ctx) -> Any:
    value = _get(rec, name, ctx)
    if value is None:
        col = ctx.cfg.columns.get(name, name)
        named = f"{col!r} (our {name!r})" if col != name else repr(name)
        raise BadExample(f"missing required field {named} for format {ctx.fmt}")
    return value


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadExample(f"{what} must be text, not {type(value).__name__}")


def _list(value: Any, what: str) -> list:
    if isinstance(value, str):  # CSV cells hold lists as JSON
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise BadExample(f"{what} is not a list (nor a JSON list: {e})") from None
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise BadExample(f"{what} must be a list, not {type(value).__name__}")
    return value


def _system_turns(rec: dict[str, Any], ctx: Ctx) -> list[Turn]:
    system = _get(rec, "system", ctx)
    return [Turn("system", _text(system, "system"))] if system not in (None, "") else []


# ---- turns --------------------------------------------------------------------------------


def _parse_turns(items: list, ctx: Ctx, images: list[str]) -> list[Turn]:
    """Message dicts -> turns; image parts' paths (multimodal) are appended to ``images``."""
    role_keys, content_keys = (
        (("from", "role"), ("value", "content"))
        if ctx.fmt == "sharegpt"
        else (("role",), ("content",))
    )
    turns = []
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise BadExample(
                f"turn {i} must be an object with {role_keys[0]!r} and {content_keys[0]!r}"
            )
        raw = next((item[k] for k in role_keys if k in item), None)
        if raw is None:
            raise BadExample(f"turn {i} has no {role_keys[0]!r} key")
        if isinstance(raw, list | dict) or raw not in ctx.tags:  # (a list is unhashable)
            known = ", ".join(sorted(map(str, ctx.tags)))
            raise BadExample(
                f"unknown role {raw!r} in turn {i} (known: {known}; map others with data.role_tags)"
            )
        content = next((item[k] for k in content_keys if k in item), None)
        turns.append(Turn(ctx.tags[raw], _content(content, i, ctx, images), _train_flag(item)))
    return turns


def _content(content: Any, i: int, ctx: Ctx, images: list[str]) -> str:
    if content is None:
        return ""
    if not isinstance(content, list):
        return _text(content, f"the content of turn {i}")
    pieces = []
    for part in content:
        kind = part.get("type", "text") if isinstance(part, dict) else "text"
        if kind == "text":
            pieces.append(_text(part.get("text", "") if isinstance(part, dict) else part, "text"))
        elif kind in ("image", "image_url"):
            if ctx.fmt != "multimodal":
                raise BadExample(f"turn {i} has an image part; use format multimodal for images")
            pieces.append(IMAGE)
            ref = part.get("image") or part.get("path") or (part.get("image_url") or {})
            ref = ref.get("url") if isinstance(ref, dict) else ref
            if isinstance(ref, str):
                images.append(ref)
        else:
            raise BadExample(f"turn {i} has a content part of unsupported type {kind!r}")
    return "\n".join(pieces)


def _train_flag(item: dict[str, Any]) -> bool | None:
    # OpenAI fine-tuning files mark turns with "weight": 0|1; some tools use "train".
    flag = item.get("train", item.get("weight"))
    return None if flag is None else bool(flag)


def _finish_turns(conv: Conversation, ctx: Ctx) -> None:
    """Add ``data.system`` where the example has none, then check the role order."""
    if ctx.cfg.system is not None and conv.system is None:
        conv.turns.insert(0, Turn("system", ctx.cfg.system))
    turns = conv.turns
    start = 1 if turns and turns[0].role == "system" else 0
    if len(turns) == start:
        raise BadExample("the example has no user or assistant turns")
    prev = "system"
    for i, turn in enumerate(turns[start:], start=start + 1):
        if turn.role == "system":
            raise BadExample(f"turn {i} is a system turn; a system turn is only allowed first")
        if turn.role not in _NEXT[prev]:
            raise BadExample(
                f"roles do not alternate: turn {i} is {turn.role} after a {prev} turn (expected "
                f"{' or '.join(_NEXT[prev])}; after the optional system turn user and "
                "assistant alternate, tool turns follow an assistant)"
            )
        prev = turn.role
    if prev != "assistant":
        raise BadExample(
            f"the conversation ends with a {prev} turn; it must end with an assistant one"
        )
    if not turns[-1].content.strip():
        raise BadExample("the final assistant turn is empty")


# ---- formats ------------------------------------------------------------------------------


def _alpaca(rec: dict[str, Any], ctx: Ctx) -> Conversation:
    turns = _system_turns(rec, ctx)
    for pair in _list(_get(rec, "history", ctx) or [], "history"):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise BadExample("history must be a list of [question, answer] pairs")
        turns += [
            Turn("user", _text(pair[0], "history")),
            Turn("assistant", _text(pair[1], "history")),
        ]
    instruction = _text(_require(rec, "instruction", ctx), "instruction")
    extra = _text(_get(rec, "input", ctx) or "", "input")
    prompt = "\n\n".join(p for p in (instruction, extra) if p)  # an empty input adds nothing
    output = _text(_require(rec, "output", ctx), "output")
    return Conversation(turns=[*turns, Turn("user", prompt), Turn("assistant", output)])


def _chat(rec: dict[str, Any], ctx: Ctx, images: list[str] | None = None) -> Conversation:
    """sharegpt (``conversations``) and messages / multimodal (``messages``), plus ``tools``."""
    name = "conversations" if ctx.fmt == "sharegpt" else "messages"
    items = _list(_require(rec, name, ctx), name)
    turns = _system_turns(rec, ctx) + _parse_turns(items, ctx, [] if images is None else images)
    tools = _get(rec, "tools", ctx)
    return Conversation(turns=turns, tools=_list(tools, "tools") if tools else None)


def _multimodal(rec: dict[str, Any], ctx: Ctx) -> Conversation:
    from_parts: list[str] = []
    conv = _chat(rec, ctx, from_parts)
    listed = _get(rec, "images", ctx)
    refs = _list(listed, "images") if listed else from_parts
    conv.images = [_image_path(ref, ctx) for ref in refs]
    slots = sum(t.content.count(IMAGE) for t in conv.turns)
    if slots and slots != len(conv.images):
        raise BadExample(f"the messages hold {slots} {IMAGE} placeholders but {len(refs)} images")
    return conv


def _image_path(ref: Any, ctx: Ctx) -> str:
    if not isinstance(ref, str) or "://" in ref:
        raise BadExample(f"images must be local file paths, not {ref!r}")
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else ctx.base_dir / path
    if not path.is_file():
        raise BadExample(f"image file not found: {ref!r} (looked for {path})")
    return str(path)


def _text_example(rec: dict[str, Any], ctx: Ctx) -> Conversation:
    text = _text(_require(rec, "text", ctx), "text")
    if not text.strip():
        raise BadExample("the text is empty")
    return Conversation(text=text)


def _classification(rec: dict[str, Any], ctx: Ctx) -> Conversation:
    cfg = ctx.cfg
    label = _text(_require(rec, "label", ctx), "label").strip()
    if cfg.label_set is not None and label not in map(str, cfg.label_set):
        raise BadExample(f"label {label!r} is not in data.label_set {cfg.label_set}")
    prompt = _fill_prompt(cfg.prompt or _default_prompt(rec, ctx), rec, ctx)
    turns = [*_system_turns(rec, ctx), Turn("user", prompt), Turn("assistant", label)]
    return Conversation(turns=turns, label=label)


def _fill_prompt(template: str, rec: dict[str, Any], ctx: Ctx) -> str:
    """``{field}`` placeholders <- the record's fields; ``{labels}`` <- data.label_set."""
    labels = ctx.cfg.label_set
    values = {"labels": ", ".join(map(str, labels or []))}
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as e:
        raise TunelabError(f"data.prompt is not a valid template ({e}); write {{field}}.") from e
    if "labels" in names and not labels:
        raise TunelabError("data.prompt uses {labels} but data.label_set is not set; list them.")
    for name in names - {"labels"}:
        value = _get(rec, name, ctx)
        if value is None:
            raise BadExample(f"missing field {name!r} used by the classification prompt")
        values[name] = _text(value, name)
    try:
        return template.format(**values)
    except (IndexError, KeyError, ValueError) as e:
        raise TunelabError(f"data.prompt could not be filled ({e!r}); use named {{fields}}.") from e


def _default_prompt(rec: dict[str, Any], ctx: Ctx) -> str:
    if _get(rec, "title", ctx) is not None or _get(rec, "abstract", ctx) is not None:
        body, what = PAPER_PROMPT, "paper"
    elif _get(rec, "text", ctx) is not None:
        body, what = TEXT_PROMPT, "text"
    else:  # one row (skippable); if every row lacks them, the source ends up empty
        raise BadExample(
            f"classification example without title/abstract or text fields (fields: "
            f"{sorted(rec)}); if the data names its text otherwise, set data.prompt to a "
            "template naming the fields, e.g. 'Review: {review}'"
        )
    ask = "one of: {labels}" if ctx.cfg.label_set else "its category"
    return f"Classify the {what} into {ask}.\n\n{body}"


def _preference(rec: dict[str, Any], ctx: Ctx) -> Conversation:
    chosen, rejected = _require(rec, "chosen", ctx), _require(rec, "rejected", ctx)
    prompt, messages = _get(rec, "prompt", ctx), _get(rec, "messages", ctx)
    if isinstance(prompt, list):  # a conversational prompt
        prompt, messages = None, prompt
    if messages is not None:
        turns = _parse_turns(_list(messages, "messages"), ctx, [])
    elif prompt is not None:
        turns = [Turn("user", _text(prompt, "prompt"))]
    elif isinstance(chosen, list):  # chosen holds the whole conversation
        turns = _parse_turns(chosen[:-1], ctx, [])
    else:
        raise BadExample("missing required field 'prompt' (or 'messages') for format preference")
    rejected_text = _answer(rejected, "rejected", ctx)
    if not rejected_text.strip():
        raise BadExample("the rejected answer is empty")
    turns = [*_system_turns(rec, ctx), *turns, Turn("assistant", _answer(chosen, "chosen", ctx))]
    return Conversation(turns=turns, rejected=rejected_text)


def _answer(value: Any, what: str, ctx: Ctx) -> str:
    if isinstance(value, list):  # a message list: the answer is its last message
        turns = _parse_turns(value[-1:], ctx, [])
        if not turns or turns[0].role != "assistant":
            raise BadExample(f"{what} must end with an assistant message")
        return turns[0].content
    return _text(value, what)


PARSERS = {
    "alpaca": _alpaca,
    "sharegpt": _chat,
    "messages": _chat,
    "multimodal": _multimodal,
    "text": _text_example,
    "classification": _classification,
    "preference": _preference,
}
