"""Prompts as users give them (text, chat messages, token ids) -> token ids."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from tunelab.errors import TunelabError

Messages = list[dict[str, Any]]
Prompt = str | Messages | list[int]


def encode_prompt(
    tokenizer: Any | None, prompt: Prompt, chat_template: str | None = None
) -> list[int]:
    """Token ids of ``prompt``: text as is, messages through the chat template
    (``chat_template``, e.g. a LoRA adapter's own, else the tokenizer's)."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return encode_chat(tokenizer, prompt, chat_template=chat_template)
    if isinstance(prompt, str):
        return _require(tokenizer, "text prompts")(check_text(prompt, "the prompt"))["input_ids"]
    if isinstance(prompt, list) and not prompt:
        raise TunelabError("the prompt is empty: give at least one token.")
    raise TunelabError(
        f"a prompt is text, a list of chat messages (dicts) or a list of token ids, "
        f"not {type(prompt).__name__}."
    )


def encode_chat(
    tokenizer: Any | None,
    messages: Messages,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> list[int]:
    """Render ``messages`` with ``chat_template`` (default: the tokenizer's), by default ready
    for the answer (``add_generation_prompt``: the assistant turn's opening)."""
    tokenizer = _require(tokenizer, "chat messages")
    if not messages:
        raise TunelabError("the conversation is empty: send at least one message.")
    if not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TunelabError('every chat message needs a "role" (and "content"): {"role": ...}.')
    messages = [_text_content(m) for m in messages]
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise TunelabError(
            "this model's tokenizer has no chat template: send plain text (a raw prompt) "
            "instead of messages."
        )
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except (TemplateError, TypeError) as e:  # its own checks (roles must alternate...)
        raise TunelabError(f"the chat template rejected the messages: {e}") from None
    text = check_text(text, "the messages")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _text_content(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-style content parts ``[{"type": "text", "text": ...}]`` joined as training joins
    them (data/parsers.py: one newline between parts); other parts are refused."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        kind = part.get("type", "text") if isinstance(part, dict) else "text"
        if kind != "text":
            raise TunelabError(f"content parts of type {kind!r} are not supported; send text.")
        texts.append(part.get("text", "") if isinstance(part, dict) else str(part))
    return {**message, "content": "\n".join(texts)}


def check_strings(value: Any, what: str) -> None:
    """``check_text`` on every string (keys too) of a JSON-like value."""
    if isinstance(value, str):
        check_text(value, what)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_strings(k, what)
            check_strings(v, what)
    elif isinstance(value, list):
        for v in value:
            check_strings(v, what)


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode; a lone surrogate (e.g. from JSON "\\ud800") raises."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        if "\udc80" <= char <= "\udcff":  # how Python hands over argv / stdin bytes
            why = f"the byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8 text"
        else:
            why = f"an invalid character {char!r} (a lone UTF-16 surrogate, not Unicode text)"
        raise TunelabError(f"{what} holds {why} at offset {e.start}: fix or drop it.") from None
    return text


def is_single_prompt(prompts: Any) -> bool:
    """True for one prompt (text, messages, token ids), False for a list of prompts."""
    if isinstance(prompts, str):
        return True
    return isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int | dict)


def _require(tokenizer: Any | None, what: str) -> Any:
    if tokenizer is None:
        raise TunelabError(f"{what} need a tokenizer; this engine has none: pass token ids.")
    return tokenizer
