"""The one internal example type every reader produces and every template consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Turn:
    role: str  # one of ROLES
    content: str
    train: bool | None = None  # None: the default policy (assistant turns are trained)


@dataclass
class Conversation:
    """A chat example (``turns``), or a plain-text one (``text``) for pretraining-style data.

    ``source`` is "file:line" (or "file:row") so every error can point at the example.
    """

    turns: list[Turn] = field(default_factory=list)
    text: str | None = None  # plain text: no template, every token trained
    tools: list[dict[str, Any]] | None = None
    images: list[str] = field(default_factory=list)
    rejected: str | None = None  # preference data: the rejected final answer
    label: str | None = None  # classification data: the gold label (also the answer)
    source: str = ""

    @property
    def system(self) -> str | None:
        return self.turns[0].content if self.turns and self.turns[0].role == "system" else None

    def to_messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages for ``tokenizer.apply_chat_template``."""
        return [{"role": t.role, "content": t.content} for t in self.turns]
