"""``tunelab VERB ...``: parse flags, call the stage function, turn user errors into one line.

No logic lives here: each verb maps to one function in its stage module.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import traceback
from collections.abc import Callable

from tunelab import __version__
from tunelab.engine.flags import add_device_flag, add_engine_flags
from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")


# ---- verbs ----------------------------------------------------------------------------------


def cmd_env(args: argparse.Namespace) -> int:
    from tunelab.env import run

    return run(as_json=args.json)


def cmd_convert(args: argparse.Namespace) -> int:
    from tunelab.models.convert import convert

    out = convert(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.engine.prompts import check_text
    from tunelab.engine.simple import SimpleGenerator

    params = sampling_params(args)  # bad flags fail before a model is fetched or loaded
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        where = "standard input (--prompt -) was empty" if args.prompt == "-" else "it is empty"
        raise TunelabError(f"no prompt: {where}; give the text to complete.")
    check_text(prompt, "the prompt")  # bytes that are not UTF-8 arrive as lone surrogates
    gen = SimpleGenerator.load(args.model, args.device, args.dtype, adapter=args.adapter)
    if args.raw:
        ids = gen.encode_text(prompt)
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = gen.encode_chat([*system, {"role": "user", "content": prompt}])
    for delta in gen.stream(ids, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.chat import run_chat
    from tunelab.engine.simple import SimpleGenerator

    params = sampling_params(args)  # bad flags fail before a model is fetched or loaded
    gen = SimpleGenerator.load(args.model, args.device, args.dtype, adapter=args.adapter)
    run_chat(gen, params, system=args.system)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tunelab.data.commands import run_prepare, run_show

    if args.data_verb == "prepare":
        return run_prepare(args.config, args.overrides)
    if args.n < 1:
        raise TunelabError(f"-n must be at least 1 (got {args.n}).")
    return run_show(args.config, args.n, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.train.commands import run_train

    overrides = list(args.overrides)
    if args.overwrite:
        overrides += ["--overwrite", "true"]
    if args.resume:
        overrides += ["--resume", args.resume]
    return run_train(args.config, overrides, args.dry_run)


def cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.export.commands import run_merge

    return run_merge(args)


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.export.commands import run_export

    return run_export(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from tunelab.serve.commands import run_serve

    return run_serve(args)


def cmd_deploy(args: argparse.Namespace) -> int:
    from tunelab.serve.commands import run_deploy

    return run_deploy(args)


def cmd_infer(args: argparse.Namespace) -> int:
    from tunelab.engine.flags import engine_config
    from tunelab.engine.infer import run_infer

    params = sampling_params(args)  # checked before the model loads
    summary = run_infer(
        args.model,
        args.input,
        args.output,
        params,
        device=args.device,
        dtype=args.dtype,
        adapter=args.adapter,
        raw=args.raw,
        system=args.system,
        engine_config=engine_config(args),
    )
    # 0 written: every id was already there
    print(f"wrote {summary.written} new result(s) to {args.output}")
    if summary.failed:
        print(
            f'error: {summary.failed} request(s) failed (their lines hold "error"); run the same '
            "command again to retry them.",
            file=sys.stderr,
        )
        return 1
    return 0


def sampling_params(args: argparse.Namespace):
    from tunelab.engine.sampler import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or [],
    )


# ---- parser ---------------------------------------------------------------------------------


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="model spec: 'default' (embedded SmolLM2-135M-Instruct), a local HF directory, "
        "a .gguf file, org/name or hf://org/name (Hugging Face), modelscope://org/name "
        "(default: %(default)s)",
    )
    add_device_flag(p)
    p.add_argument(
        "--dtype",
        default=None,
        choices=["auto", "bf16", "fp16", "fp32"],
        help="compute dtype (default: bf16 on GPUs/NPUs that support it, fp32 on CPU)",
    )


def _add_adapter_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter to apply (not merged)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default: 256)")
    g.add_argument(
        "--temperature",
        type=float,
        default=0.7,
        help="0 = greedy; higher = more random (default: 0.7)",
    )
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    g.add_argument(
        "--top-k", type=int, default=0, help="keep the k likeliest tokens (default: 0 = off)"
    )
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (default: 1)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop when TEXT appears (repeatable)"
    )
    g.add_argument("--system", default=None, help="system prompt")


VERBS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "env": (cmd_env, "diagnose Python, torch, drivers, devices and known problems"),
    "convert": (cmd_convert, "convert a model (GGUF or any spec) to an HF-format directory"),
    "generate": (cmd_generate, "complete one prompt and print the answer"),
    "chat": (cmd_chat, "interactive chat with streamed answers"),
    "infer": (cmd_infer, "batch inference over a JSONL file on the paged engine (resumable)"),
    "data": (cmd_data, "prepare (tokenize + cache) or show training data from a config file"),
    "train": (cmd_train, "fine-tune (full / freeze / LoRA / QLoRA) from a YAML config"),
    "merge": (cmd_merge, "merge a LoRA adapter into its base, verified, as an HF directory"),
    "export": (cmd_export, "export a model or adapter as HF, PEFT or GGUF (llama.cpp/Ollama)"),
    "serve": (cmd_serve, "OpenAI-compatible HTTP server (or start vLLM / SGLang / LMDeploy)"),
    "deploy": (cmd_deploy, "write a Dockerfile and Kubernetes / KServe manifests for serving"),
}


VERBS_WITH_OVERRIDES = ("data", "train")  # verbs reading a config file take --section.key overrides
TOP_LEVEL_KEYS = ("--model", "--method", "--output_dir", "--output-dir")  # sectionless keys


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take ``--section.key VALUE`` (and top-level config keys) out of argv for the config."""
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb not in VERBS_WITH_OVERRIDES:
        return argv, []
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        is_override = arg.startswith("--") and ("." in name or name in TOP_LEVEL_KEYS)
        if not is_override:
            rest.append(arg)
        elif "=" in arg or i + 1 >= len(argv):
            overrides.append(arg)
        else:
            overrides += [arg, argv[i + 1]]
            i += 1
        i += 1
    return rest, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune, export and serve open LLMs on CUDA, Ascend NPU or CPU.",
    )
    parser.add_argument("--version", action="version", version=f"tunelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    # The same two flags after the verb (`tunelab train x.yaml --debug`); SUPPRESS keeps a
    # flag given before the verb from being reset by the verb's default.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    parsers = {
        name: sub.add_parser(name, help=help_, description=help_, parents=[common])
        for name, (_, help_) in VERBS.items()
    }
    parser.verb_parsers = parsers  # main() reports unknown flags with the verb's own usage

    parsers["env"].add_argument("--json", action="store_true", help="print the report as JSON")

    p = parsers["convert"]
    p.add_argument("src", help="model spec to convert (a .gguf file, a directory, a hub id)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        default=None,
        help="weight dtype (default: fp32 for GGUF, else the source's dtype)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = parsers["generate"]
    _add_model_flags(p)
    _add_adapter_flag(p)
    p.add_argument("--prompt", required=True, help="the prompt ('-' reads stdin)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as plain text instead of one chat-templated user message",
    )
    _add_sampling_flags(p)

    p = parsers["infer"]
    _add_model_flags(p)
    p.add_argument("--input", required=True, help='JSONL of {"id", "prompt"} or {"id", "messages"}')
    p.add_argument("--output", required=True, help="JSONL results (ids already there are skipped)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format)")
    p.add_argument("--raw", action="store_true", help="send prompts as plain text, no template")
    _add_sampling_flags(p)
    add_engine_flags(p)

    p = parsers["chat"]
    _add_model_flags(p)
    _add_adapter_flag(p)
    _add_sampling_flags(p)

    data_sub = parsers["data"].add_subparsers(dest="data_verb", metavar="ACTION")
    data_sub.required = True
    overrides_help = (
        "Any key of the config can be overridden on the command line: --SECTION.KEY VALUE, "
        "e.g. --data.max_length 512 --data.packing true."
    )
    p = data_sub.add_parser(
        "prepare",
        parents=[common],
        help="tokenize and cache the data; print examples read, skipped, truncated, tokens",
        description="Tokenize and cache the data section of CONFIG, then print statistics.",
        epilog=overrides_help,
    )
    p.add_argument("config", help="YAML config with `model` and `data` sections")
    p = data_sub.add_parser(
        "show",
        parents=[common],
        help="print rendered examples with the trained tokens highlighted",
        description="Render the first examples through the chat template; trained tokens are "
        "green on a terminal and inside [[ ]] otherwise.",
        epilog=overrides_help,
    )
    p.add_argument("config", help="YAML config with `model` and `data` sections")
    p.add_argument("-n", type=int, default=3, help="how many examples (default: 3)")
    parser.data_parsers = data_sub.choices

    p = parsers["train"]
    p.description = (
        "Fine-tune a model. CONFIG holds the sections model, method (full|freeze|lora|qlora), "
        "lora, freeze, data, train and output_dir; see examples/*.yaml."
    )
    p.epilog = overrides_help + " Example: --train.max_steps 3 --output_dir runs/x"
    p.add_argument("config", nargs="?", help="YAML recipe (optional when every key is a flag)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, trainable parameters and a memory estimate; "
        "refuse when it will not fit",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run in output_dir")
    p.add_argument(
        "--resume",
        default=None,
        help="auto (default: continue a matching run in output_dir), never, or a checkpoint dir",
    )
    from tunelab.export.commands import add_export_flags, add_merge_flags

    add_merge_flags(parsers["merge"])
    add_export_flags(parsers["export"])
    from tunelab.serve.commands import add_deploy_flags, add_serve_flags

    add_serve_flags(parsers["serve"])
    parser.deploy_parsers = add_deploy_flags(parsers["deploy"], common)
    return parser


def setup_logging(debug: bool, quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    console = Console(stderr=True)  # stdout carries only the answer (`generate ... > out.txt`)
    handler = RichHandler(console=console, show_path=debug, show_time=False, rich_tracebacks=debug)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _refuse_unknown(parser: argparse.ArgumentParser, args, unknown: list[str]) -> None:
    """Unknown flags: the verb's usage (not the top level's) and the closest real flag."""
    verb_parser = parser.verb_parsers[args.verb]
    if args.verb == "data" and getattr(args, "data_verb", None):
        verb_parser = parser.data_parsers[args.data_verb]
    if args.verb == "deploy" and getattr(args, "deploy_target", None):
        verb_parser = parser.deploy_parsers[args.deploy_target]
    known = [o for action in verb_parser._actions for o in action.option_strings]
    flag = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), None)
    close = difflib.get_close_matches(flag, known, n=1) if flag else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    verb_parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def _user_error(e: BaseException) -> str:
    """One line for the OS-level mistakes a user makes (a bad path, undecodable input)."""
    if isinstance(e, UnicodeDecodeError):
        byte = e.object[e.start] if e.start < len(e.object) else None
        what = f"a byte 0x{byte:02x} that" if byte is not None else "a truncated character that"
        return f"an input file holds {what} is not UTF-8 text; convert the file to UTF-8."
    assert isinstance(e, OSError)
    where = f": {e.filename}" if e.filename else ""
    if isinstance(e, IsADirectoryError):
        return f"expected a file but found a directory{where}."
    if isinstance(e, NotADirectoryError | FileExistsError):
        return f"a file is in the way of a directory{where}; choose another path."
    return f"{e.strerror or e}{where}."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = split_overrides(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(parser, args, unknown)
    args.overrides = overrides
    args.debug, args.quiet = getattr(args, "debug", False), getattr(args, "quiet", False)
    setup_logging(args.debug, args.quiet)
    handler = VERBS[args.verb][0]
    try:
        return handler(args)
    except TunelabError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            FileExistsError, PermissionError) as e:  # fmt: skip
        if args.debug:
            traceback.print_exc()
        print(f"error: {_user_error(e)} (--debug shows where)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunelab generate ... | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush does not fail again
        return 0


if __name__ == "__main__":
    sys.exit(main())
