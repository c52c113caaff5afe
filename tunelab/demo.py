"""``make demo``: the main job on the embedded default model.

For now a short scripted chat (multi-turn, streamed, greedy so it is reproducible); later
stages (data -> train -> merge -> serve -> eval) join it as they land.
"""

from __future__ import annotations

import argparse
import sys
import time

from tunelab.chat import PROMPT, ChatSession
from tunelab.cli import setup_logging
from tunelab.engine.sampler import SamplingParams
from tunelab.engine.simple import SimpleGenerator
from tunelab.errors import TunelabError

SCRIPT = [
    "What is the capital of France?",
    "And what is it famous for? Answer in one sentence.",
    "Give me three tips for fine-tuning a small language model.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default", help="model spec (default: %(default)s)")
    parser.add_argument("--device", default=None, help="device (default: best available)")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per answer")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    setup_logging(debug=args.debug, quiet=False)
    try:
        return _run(args)
    except TunelabError as e:  # a bad --model / --device, a failed download: one line
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    generator = SimpleGenerator.load(args.model, device=args.device)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    session = ChatSession()  # the model's own default system prompt
    print(f"== scripted chat with {args.model} on {generator.model.device} ==")
    for question in SCRIPT:
        print(f"{PROMPT}{question}")
        start, answer = time.perf_counter(), []
        for delta in generator.stream(generator.encode_chat(session.messages(question)), params):
            answer.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        text = "".join(answer)
        n = len(generator.tokenizer(text, add_special_tokens=False)["input_ids"])
        print(f"\n   [{n} tokens, {n / (time.perf_counter() - start):.1f} tok/s]\n")
        session.record(question, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
