"""The chat REPL driven through StringIO: prompts, streamed answers, history and commands."""

from __future__ import annotations

import io

import pytest
import torch

from tunelab.chat import HELP, PROMPT, ChatSession, run_chat
from tunelab.engine.sampler import SamplingParams
from tunelab.engine.simple import SimpleGenerator
from tunelab.models.loading import load_model, load_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=5)
QUESTION = "What is the capital of France?"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def generator(make_tiny_model) -> SimpleGenerator:
    path = make_tiny_model("llama")
    return SimpleGenerator(load_model(path, "cpu", torch.float32), load_tokenizer(path))


@pytest.fixture
def sent(generator, monkeypatch) -> list[list[dict[str, str]]]:
    """The message lists run_chat renders, in order (a spy on ``generator.encode_chat``)."""
    calls: list[list[dict[str, str]]] = []
    original = generator.encode_chat

    def spy(messages):
        calls.append([dict(m) for m in messages])
        return original(messages)

    monkeypatch.setattr(generator, "encode_chat", spy)
    return calls


def chat(generator, lines: str, system: str | None = None) -> tuple[str, io.StringIO]:
    """Run the REPL on ``lines``; return what it printed and the (partly read) stdin."""
    stdin, stdout = io.StringIO(lines), io.StringIO()
    assert run_chat(generator, GREEDY, system=system, stdin=stdin, stdout=stdout) is None
    return stdout.getvalue(), stdin


# ---- turns and history --------------------------------------------------------------------


def test_transcript_and_growing_history(generator, sent):
    out, _ = chat(generator, f"hello\n{QUESTION}\n")

    assert len(sent) == 2
    assert sent[0] == [user("hello")]
    first = generator.chat(sent[0], GREEDY)
    assert [m["role"] for m in sent[1]] == ["user", "assistant", "user"]
    assert sent[1] == [user("hello"), assistant(first), user(QUESTION)]
    second = generator.chat(sent[1], GREEDY)
    # each streamed answer equals the non-streamed one; one prompt per line plus one at EOF
    assert out == f"{HELP}\n{PROMPT}{first}\n{PROMPT}{second}\n{PROMPT}\n"
    assert out.count(PROMPT) == 3


def test_blank_lines_are_skipped(generator, sent):
    out, _ = chat(generator, "\n   \nhello\n")
    assert sent == [[user("hello")]]
    assert out.count(PROMPT) == 4  # three lines + EOF


def test_eof_without_exit_returns_cleanly(generator, sent):
    out, _ = chat(generator, "")
    assert out == f"{HELP}\n{PROMPT}\n"
    assert sent == []


def test_last_line_without_newline_is_answered(generator, sent):
    out, _ = chat(generator, "hello")
    assert sent == [[user("hello")]]
    assert out.endswith(f"\n{PROMPT}\n")


# ---- commands -----------------------------------------------------------------------------


def test_system_command_sets_prompt_and_resets(generator, sent):
    out, _ = chat(generator, "hello\n/system Be brief\nhi\nagain\n")
    assert "(system prompt set)" in out
    assert sent[1] == [system("Be brief"), user("hi")]  # history before /system is gone
    assert sent[2][0] == system("Be brief") and sent[2][-1] == user("again")
    assert [m["role"] for m in sent[2]] == ["system", "user", "assistant", "user"]


def test_system_command_without_text_removes_prompt(generator, sent):
    out, _ = chat(generator, "/system\nhi\n", system="Be brief")
    assert "(system prompt removed)" in out
    assert sent == [[user("hi")]]


def test_system_argument_comes_first(generator, sent):
    chat(generator, "hi\n", system="You are terse.")
    assert sent == [[system("You are terse."), user("hi")]]


def test_reset_clears_history_but_keeps_system(generator, sent):
    out, _ = chat(generator, "hello\n/reset\nhi\n", system="S")
    assert "(history cleared; the system prompt stays)" in out
    assert sent == [[system("S"), user("hello")], [system("S"), user("hi")]]


@pytest.mark.parametrize("command", ["/exit", "/quit", "  /exit  "])
def test_exit_stops_before_later_lines(generator, sent, command):
    out, stdin = chat(generator, f"hello\n{command}\nnever sent\n")
    assert sent == [[user("hello")]]
    assert out.count(PROMPT) == 2 and out.endswith(PROMPT)  # nothing printed after /exit
    assert stdin.read() == "never sent\n"  # not even read


def test_unknown_command_prints_hint(generator, sent):
    out, _ = chat(generator, "/foo bar\n")
    assert f"unknown command /foo. {HELP}\n" in out
    assert sent == []


def test_a_command_is_a_whole_word(generator, sent):
    out, _ = chat(generator, "/systemic question\n")
    assert "unknown command /systemic" in out and sent == []


def test_a_turn_that_fails_keeps_the_session(generator, sent):
    """A turn beyond the context is an error line; the next line is still answered."""
    too_long = "word " * 400  # the tiny model's context is 256 tokens
    out, _ = chat(generator, f"{too_long}\n{QUESTION}\n")
    assert "error:" in out and "/reset" in out
    assert sent[-1] == [user(QUESTION)]  # the failed turn left no trace in the history
    assert out.count(PROMPT) == 3


# ---- ChatSession and streaming ------------------------------------------------------------


def test_chat_session_messages():
    session = ChatSession()
    assert session.messages("a") == [user("a")]
    session.record("a", "b")
    assert session.messages("c") == [user("a"), assistant("b"), user("c")]
    session.system = "S"
    assert session.messages("c") == [system("S"), user("a"), assistant("b"), user("c")]
    session.reset()
    assert session.messages("d") == [system("S"), user("d")]
    assert ChatSession("").messages("x") == [user("x")]  # an empty system prompt is none


@pytest.mark.parametrize(
    ("messages", "max_tokens"),
    [
        ([user("hello")], 5),
        ([system("Be brief"), user(QUESTION)], 24),
        ([user("hello"), assistant("hi there"), user(QUESTION)], 24),
    ],
)
def test_stream_equals_non_streamed(generator, messages, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    streamed = "".join(generator.stream(generator.encode_chat(messages), params))
    assert streamed == generator.chat(messages, params)
    assert streamed  # the random model says something, so the comparison means something


def test_a_command_with_an_argument_it_does_not_take_says_so(generator, sent):
    out, _ = chat(generator, "/reset extra\n")
    assert f"/reset takes no argument. {HELP}\n" in out and sent == []


def test_ctrl_c_during_an_answer_stops_the_answer_not_the_chat(generator, sent, monkeypatch):
    original = generator.stream

    def interrupted(ids, params):
        for i, delta in enumerate(original(ids, params)):
            if i == 1:
                raise KeyboardInterrupt
            yield delta

    monkeypatch.setattr(generator, "stream", interrupted)
    out, _ = chat(generator, "hello\nagain\n")
    assert out.count(" [stopped]") == 2 and out.count(PROMPT) == 3
    assert len(sent) == 2 and sent[1][:2][0] == user("hello")  # the partial answer is kept
