"""``tunelab merge`` and ``tunelab export``: flags in, one stage function called, path out."""

from __future__ import annotations

import argparse

from tunelab.errors import TunelabError

FORMATS = ("hf", "peft", "gguf")


def run_merge(args: argparse.Namespace) -> int:
    """``tunelab merge``: the output directory to stdout (merge_adapter logs the figures)."""
    from tunelab.export.merge import merge_adapter

    report = merge_adapter(
        args.model,
        args.adapter,
        args.out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        device=args.device,
        qlora=args.qlora,
    )
    print(report.out)
    return 0


def _refuse_unused(args: argparse.Namespace) -> None:
    """A flag the chosen --format never reads is an error, not silently ignored."""
    merge = args.adapter is not None and args.format in ("hf", "gguf")
    merge_only = "only merging an adapter (--adapter with --format hf or gguf) reads it"
    hf_merge = args.adapter is not None and args.format == "hf"
    checks = [
        ("--dtype", args.dtype is not None and args.format != "hf", "only --format hf reads it"),
        ("--quant", args.quant != "f16" and args.format != "gguf", "only --format gguf reads it"),
        ("--device", args.device != "cpu" and not hf_merge,
         "only an hf merge (--adapter with --format hf) reads it; gguf merges on the CPU"),
        ("--qlora", args.qlora != "auto" and not merge, merge_only),
    ]  # fmt: skip
    for flag, unused, why in checks:
        if unused:
            raise TunelabError(f"{flag} does not apply here: {why}; drop it.")


def run_export(args: argparse.Namespace) -> int:
    """``tunelab export --format hf|peft|gguf``: prints the written path."""
    _refuse_unused(args)
    if args.format == "hf":
        if args.adapter:
            args.dtype = args.dtype or "bf16"
            return run_merge(args)
        from tunelab.models.convert import convert

        print(convert(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite))
        return 0
    if args.format == "peft":
        if not args.adapter:
            raise TunelabError("--format peft exports an adapter: pass --adapter DIR.")
        from tunelab.export.peft import export_peft

        print(export_peft(args.model, args.adapter, args.out, overwrite=args.overwrite))
        return 0
    from tunelab.export.gguf import export_gguf

    out = export_gguf(
        args.model,
        args.out,
        adapter=args.adapter,
        quant=args.quant,
        overwrite=args.overwrite,
        qlora=args.qlora,
    )
    print(out)
    return 0


def add_merge_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``tunelab merge``."""
    p.add_argument("--model", default="default", help="base model spec (default: %(default)s)")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp16", "fp32"],
        help="dtype of the merged weights (default: %(default)s; the merge itself runs in fp32)",
    )
    _add_common(p)


def add_export_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``tunelab export``."""
    p.add_argument("--model", default="default", help="model spec (default: %(default)s)")
    p.add_argument("--adapter", default=None, help="PEFT LoRA adapter to merge or export")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf, peft or gguf")
    p.add_argument("--out", required=True, help="output directory (hf, peft) or .gguf file")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="hf: weight dtype (default: bf16 when merging, else the source's dtype)",
    )
    p.add_argument(
        "--quant",
        default="f16",
        choices=["f16", "q8_0", "f32"],
        help="gguf: tensor type (default: %(default)s)",
    )
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="cpu", help="where an adapter merge computes (default: cpu)")
    p.add_argument(
        "--qlora",
        default="auto",
        choices=["auto", "yes", "no"],
        help="merge into the NF4-dequantized base the adapter was trained on (auto: detect "
        "from the adapter or its training run)",
    )
