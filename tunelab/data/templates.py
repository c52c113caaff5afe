"""Chat-template rendering with assistant-only loss masks.

``encode`` renders a ``Conversation`` with the tokenizer's own Jinja chat template and returns
token ids plus labels. Conventions:

- **Labels are aligned with input_ids** (HF convention): ``labels[t]`` is the target *for* token
  ``t``; the trainer shifts (position t predicts ``labels[t + 1]``). ``IGNORE_INDEX`` marks
  untrained tokens.
- **Trained span of an answer** = what the template emits for the assistant turn after the
  generation prompt: the answer *and* its end-of-turn token(s) (``<|im_end|>``, ``<|eot_id|>``,
  ``</s>``), so the model learns to stop, but *not* whitespace the template writes after them
  (ChatML's ``\\n`` after ``<|im_end|>``): generation stops at the end-of-turn token, so that
  newline is never generated; it belongs to the next prompt. A token is trained when it overlaps
  the span's characters (a BPE token merging prompt and answer text is trained).
- The span is found by **rendering prefixes**: ``messages[:i]`` with the generation prompt ends
  where the answer starts, ``messages[:i + 1]`` ends where it ends. Templates that add a default
  system prompt are handled by construction. Templates that render a turn differently once
  later turns follow (Qwen3 drops think blocks from history, Mistral v0.3 moves the system
  prompt into the last user turn, Phi-3 ends a whole chat with eos), and non-assistant turns,
  are located by rendering the whole chat with a sentinel in place of the turn's content: the
  text around the sentinel is the text around the content. Its end-of-turn is what the
  template writes after the content when the turn is last, as far as the chat continues with
  it (never half of the next turn's special token).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from os.path import commonprefix
from typing import Any, Literal

from tunelab.data.conversation import Conversation
from tunelab.errors import TunelabError

IGNORE_INDEX = -100
SKIP_TOO_LONG = "too_long"  # longer than max_length with truncation="drop"
SKIP_NO_TARGET = "no_target"  # no trained token (left), e.g. the answer was truncated away

_NL = "{{ '\\n' }}"
BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML: <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama-2 chat: <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>
    "llama-2": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'assistant' %}"
        "{{ ' ' + m['content'] + ' ' + (eos_token or '') }}"
        "{% else %}{{ (bos_token or '') + '[INST] ' }}"
        "{% if loop.first and sys %}{{ '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' }}{% endif %}"
        "{{ m['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
    ),
    # Alpaca: preamble, ### Instruction:\n..., ### Response:\n...</s>
    "alpaca": (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\\n\\n' }}{% set rest = messages[1:] %}"
        "{% else %}{{ 'Below is an instruction. Write a response that completes it.\\n\\n' }}"
        "{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + m['content'] + (eos_token or '') + '\\n\\n' }}"
        "{% else %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # Plain: contents one per line, no role markers; answers end with eos.
    "plain": (
        "{{ bos_token or '' }}{% for m in messages %}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}" + _NL + "{% endfor %}"
    ),
}


@dataclass
class Encoded:
    """Token ids and aligned labels (``IGNORE_INDEX`` where not trained) of one example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def resolve_template(tokenizer: Any, override: str | None) -> str:
    """The Jinja source to render with: a built-in name or Jinja string, else the tokenizer's."""
    own = getattr(tokenizer, "chat_template", None)
    if override:
        if override in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[override]
        if "{{" in override or "{%" in override:
            return override
        if isinstance(own, dict) and override in own:  # a named template of the tokenizer
            return own[override]
        raise TunelabError(
            f"unknown data.template {override!r}: use one of {', '.join(BUILTIN_TEMPLATES)}, "
            "or a Jinja template string."
        )
    if isinstance(own, dict):
        own = own.get("default")
    if not own:
        raise TunelabError(
            "the tokenizer has no chat template; set data.template: chatml (or llama-2, alpaca, "
            "plain, or a Jinja template string)."
        )
    return own


def encode_or_skip(
    conv: Conversation,
    tokenizer: Any,
    template: str,
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    max_length: int | None = None,
    truncation: Literal["truncate", "drop"] = "truncate",
    verify: bool = True,
) -> Encoded | str:
    """Tokenize ``conv`` with its loss mask, or say why it is dropped (the caller counts these).

    ``train_on_prompt`` trains every token (except turns with ``train=False``); ``mask_history``
    trains only the last assistant answer; ``Turn.train`` overrides the policy per turn.
    Longer than ``max_length``: "truncate" keeps the start and sets ``truncated``, "drop"
    returns ``SKIP_TOO_LONG``. No trained token (left) returns ``SKIP_NO_TARGET``. ``verify``
    checks the ids against ``apply_chat_template(tokenize=True)`` (one more tokenization); a
    mismatch raises TunelabError naming ``conv.source``.
    """
    if truncation not in ("truncate", "drop"):
        raise TunelabError(f"data.truncation must be 'truncate' or 'drop' (got {truncation!r}).")
    if conv.text is not None:
        ids, labels = _encode_text(conv.text, tokenizer)
    elif conv.turns:
        ids, labels = _encode_chat(conv, tokenizer, template, train_on_prompt, mask_history)
        if verify:
            _verify(conv, tokenizer, template, ids)
    else:
        return SKIP_NO_TARGET
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if truncation == "drop":
            return SKIP_TOO_LONG
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return SKIP_NO_TARGET
    return Encoded(ids, labels, truncated)


def encode(conv: Conversation, tokenizer: Any, template: str, **options: Any) -> Encoded | None:
    """``encode_or_skip`` (same keyword options) with None for a dropped example."""
    out = encode_or_skip(conv, tokenizer, template, **options)
    return out if isinstance(out, Encoded) else None


def _encode_text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Plain text: the tokenizer's own BOS handling, eos appended, every token trained."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)


def _encode_chat(
    conv: Conversation, tokenizer: Any, template: str, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]]:
    messages = conv.to_messages()

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs,
            chat_template=template,
            tools=conv.tools,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    try:
        text = render(messages, False)
    except Exception as e:  # Jinja raise_exception, bad roles, template bugs
        raise TunelabError(
            f"{conv.source}: the chat template cannot render this conversation ({e}); fix the "
            "example or choose another data.template."
        ) from e
    tokens = _TokenIndex(tokenizer, text, conv.source)
    if train_on_prompt:  # everything, minus turns explicitly marked train=False
        labels, chosen = list(tokens.ids), [t.train is False for t in conv.turns]
    else:
        labels, chosen = [IGNORE_INDEX] * len(tokens.ids), _trained_turns(conv, mask_history)
    for i in (i for i, c in enumerate(chosen) if c):
        a, b = _turn_span(render, messages, i, text, conv.source)
        if a < b:
            ta, tb = tokens.span(a, b)
            labels[ta:tb] = [IGNORE_INDEX] * (tb - ta) if train_on_prompt else tokens.ids[ta:tb]
    return tokens.ids, labels


def _trained_turns(conv: Conversation, mask_history: bool) -> list[bool]:
    """Per turn: its own ``train`` flag, else assistant turns (only the last with mask_history)."""
    answers = [i for i, t in enumerate(conv.turns) if t.role == "assistant"]
    last = answers[-1] if answers else -1
    return [
        t.train
        if t.train is not None
        else (t.role == "assistant" and (not mask_history or i == last))
        for i, t in enumerate(conv.turns)
    ]


def _turn_span(
    render: Callable[[list[dict[str, str]], bool], str],
    messages: list[dict[str, str]],
    i: int,
    text: str,
    source: str,
) -> tuple[int, int]:
    """Character span of turn ``i`` in ``text``: after its generation prompt (assistant) or
    from its content (others), through its end-of-turn token, trailing whitespace cut."""
    answer = messages[i]["role"] == "assistant"
    before = _try_render(render, messages[:i], answer) if i else ("" if not answer else None)
    after = _try_render(render, messages[: i + 1], False)
    exact = before is not None and after is not None and len(after) >= len(before)
    # Other turns (a user turn marked train) start at their content, like an answer after its
    # generation prompt: not at their header, nor at a default system prompt before turn 0.
    if exact and answer and text.startswith(before) and text.startswith(after):
        return len(before), len(before) + len(text[len(before) : len(after)].rstrip())
    tail = _turn_tail(render, messages, i)
    span = _content_span(render, messages, i, text)
    if span is not None:  # where the template put this turn's content in the whole chat
        a, b = span
        b += _end_of_turn(text, b, tail)
    else:
        a, b = _locate(text, before, after, messages[i]["content"], i, source, tail)
    return a, a + len(text[a:b].rstrip())


def _content_span(
    render: Callable, messages: list[dict[str, str]], i: int, text: str
) -> tuple[int, int] | None:
    """Characters of turn ``i``'s rendered content in ``text``: the whole chat rendered with
    a sentinel for that content only differs from ``text`` there (whatever the template does
    to it: trims it, drops a think block, moves the system prompt into it)."""
    probe = [*messages[:i], {**messages[i], "content": _SENTINEL}, *messages[i + 1 :]]
    rendered = _try_render(render, probe, False)
    if rendered is None or rendered.count(_SENTINEL) != 1:
        return None
    head, tail = rendered.split(_SENTINEL, 1)
    if not (text.startswith(head) and text.endswith(tail)) or len(head) + len(tail) > len(text):
        return None
    return len(head), len(text) - len(tail)


def _end_of_turn(text: str, b: int, tail: str | None) -> int:
    """How much of what the template writes after a last turn's content (``tail``) follows
    the content at ``b``: the end-of-turn token(s), not a half special token of the next turn."""
    if not tail:
        return 0
    common = commonprefix([tail, text[b : b + len(tail)]])  # noqa: RUF071 (strings)
    if common != tail and "<" in common and ">" not in common[common.rfind("<") :]:
        common = common[: common.rfind("<")]
    return len(common)


_SENTINEL = "\u2063tunelab-turn\u2063"  # invisible separator: no template treats it specially


def _turn_tail(render: Callable, messages: list[dict[str, str]], i: int) -> str | None:
    """What the template writes after turn ``i``'s content when it is the last turn (its
    end-of-turn, a chat-final eos...), from a rendering with a sentinel for the content."""
    probe = [*messages[:i], {**messages[i], "content": _SENTINEL}]
    rendered = _try_render(render, probe, False)
    if rendered is None or rendered.count(_SENTINEL) != 1:
        return None
    return rendered.split(_SENTINEL, 1)[1]


def _try_render(render: Callable, msgs: list[dict[str, str]], generation_prompt: bool):
    """A prefix rendering, or None when the template refuses the prefix (we fall back)."""
    try:
        return render(msgs, generation_prompt)
    except Exception:  # some templates reject prefixes (e.g. "must end with a user turn")
        return None


def _locate(
    text: str,
    before: str | None,
    after: str | None,
    content: str,
    i: int,
    source: str,
    tail: str | None = None,
) -> tuple[int, int]:
    """Fallback: the turn's content in ``text`` after the common prefix with ``before``, plus
    the part of the end-of-turn suffix (what the template writes after the content when the
    turn is last) that ``text`` continues with."""
    lo = len(commonprefix([before or "", text]))  # noqa: RUF071 (strings, not paths)
    # Qwen3 drops a history turn's think block: then only the text after it is rendered.
    candidates = (content, content.strip(), content.rsplit("</think>", 1)[-1].strip())
    needle = next((c for c in candidates if c in text[lo:]), content.strip())
    # The turn's own rendering minus what follows its content (``tail``): searching there
    # never lands inside the end-of-turn text itself (content "end" in "<|im_end|>").
    end = len(after) - len(tail) if after is not None and tail and after.endswith(tail) else None
    body = after[:end] if after is not None else None
    if body is not None and text.startswith(after) and needle and needle in body[lo:]:
        # The turn's own rendering is a prefix of the text: its content is the last copy in
        # it, never an earlier one inside the prompt (templates that put the system prompt
        # into the last user turn make ``lo`` stop early, so a plain find could land there).
        a = body.rfind(needle)
    else:
        a = text.find(needle, lo)  # an empty answer: an empty span where the renderings part
    if a < 0:
        raise TunelabError(
            f"{source}: cannot find turn {i} in the rendered chat template; the template renders "
            "it differently from its prefixes. Use data.train_on_prompt or another data.template."
        )
    b = a + len(needle)
    suffix = tail
    if suffix is None and after is not None and needle in after:
        suffix = after[after.rfind(needle) + len(needle) :]
    # A history turn is followed by the next turn, not by what ends a whole chat (Phi-3 adds
    # eos there): keep the shared part, cut before a special token left half-way.
    return a, b + _end_of_turn(text, b, suffix)


class _TokenIndex:
    """Token ids of the full rendering, and character span -> token span.

    Fast tokenizers: one tokenization with offsets; a token is in a span when it overlaps it
    (the same as tokenizing the prefix when that gives a token prefix, and still right when a
    BPE merge crosses the boundary). Slow tokenizers: the prefix's tokens must be a prefix.
    """

    def __init__(self, tokenizer: Any, text: str, source: str):
        self.tokenizer, self.text, self.source = tokenizer, text, source
        fast = _offsets(tokenizer, text)
        self.ids = fast[0] if fast else _tokenize(tokenizer, text)
        self.offsets = fast[1] if fast else None

    def span(self, a: int, b: int) -> tuple[int, int]:
        """Tokens overlapping characters [a, b): first ending after a, first starting at b+."""
        if self.offsets is None:
            return self._prefix(a), self._prefix(b)
        return (
            bisect_right(self.offsets, a, key=lambda o: o[1]),
            bisect_right(self.offsets, b - 1, key=lambda o: o[0]),
        )

    def _prefix(self, pos: int) -> int:
        prefix = _tokenize(self.tokenizer, self.text[:pos])
        if self.ids[: len(prefix)] != prefix:
            raise TunelabError(
                f"{self.source}: the prompt's tokens change when the answer follows (a merge "
                "across the boundary) and this slow tokenizer has no offsets; use a fast "
                "tokenizer (tokenizer.json)."
            )
        return len(prefix)


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote BOS where it wants it: no special tokens added here.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        return None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _verify(conv: Conversation, tokenizer: Any, template: str, ids: list[int]) -> None:
    """The ids must equal ``apply_chat_template(tokenize=True)`` token for token."""
    ref = tokenizer.apply_chat_template(
        conv.to_messages(), chat_template=template, tools=conv.tools, tokenize=True
    )
    if not isinstance(ref, list):  # transformers 5 returns a BatchEncoding by default
        ref = ref["input_ids"]
    if list(ref) != ids:
        pairs = enumerate(zip(ref, ids, strict=False))
        first = next((k for k, (x, y) in pairs if x != y), min(len(ref), len(ids)))
        raise TunelabError(
            f"{conv.source}: the encoded tokens differ from tokenizer.apply_chat_template at "
            f"token {first} ({len(ids)} vs {len(ref)} tokens); the chat template does not render "
            "deterministically. Set data.template to a fixed template."
        )
