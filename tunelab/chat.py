"""Interactive chat REPL (``tunelab chat``): ``You >>`` prompt, streamed answers, history.

Commands: ``/reset`` clears the history, ``/system TEXT`` sets the system prompt (and resets),
``/exit`` (or EOF) quits. Ctrl-C during an answer stops that answer (the partial one is kept
in the history); at the prompt it quits. Works the same when stdin is a pipe, so it can be
scripted.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tunelab.engine.sampler import SamplingParams
from tunelab.engine.simple import Messages, SimpleGenerator
from tunelab.errors import TunelabError

PROMPT = "You >> "
HELP = "Commands: /reset  /system TEXT  /exit"


class ChatSession:
    """Conversation state: an optional system prompt and the turns so far."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: Messages = []

    def messages(self, user: str) -> Messages:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def record(self, user: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns = []


def run_chat(
    generator: SimpleGenerator,
    params: SamplingParams,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> None:
    """Read user lines until /exit or EOF; stream each answer to ``stdout``."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(system)
    stdout.write(f"{HELP}\n")
    while True:
        stdout.write(PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text.split()[0] in ("/reset", "/exit", "/quit") and len(text.split()) > 1:
            stdout.write(f"{text.split()[0]} takes no argument. {HELP}\n")
            continue
        if text == "/reset":
            session.reset()
            stdout.write("(history cleared; the system prompt stays)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            session.system = text.removeprefix("/system").strip() or None
            session.reset()
            stdout.write(f"(system prompt {'set' if session.system else 'removed'})\n")
            continue
        if text.startswith("/"):
            stdout.write(f"unknown command {text.split()[0]}. {HELP}\n")
            continue
        answer = []
        try:
            for delta in generator.stream(generator.encode_chat(session.messages(text)), params):
                answer.append(delta)
                stdout.write(delta)
                stdout.flush()
        except TunelabError as e:  # e.g. the history outgrew the context: keep the session
            stdout.write(f"\nerror: {e} (/reset clears the history)\n")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            stdout.write(" [stopped]")
        stdout.write("\n")
        session.record(text, "".join(answer))
