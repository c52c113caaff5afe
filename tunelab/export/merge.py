"""``tunelab merge``: fold a LoRA adapter into its base, prove it, then write an HF directory.

Steps: load the base in fp32 (QLoRA adapters: the NF4-dequantized base, see ``qlora``), apply
the adapter, merge in fp32, check every tensor is finite and fits the target dtype, compare
logits (``verify``), and only then write the directory atomically: weights + config,
tokenizer with its chat template, generation config, and ``tunelab.json``. Nothing is written
when a check fails.

Memory: the fp32 model plus one copy in the target dtype (about 6 bytes per parameter for
bf16). Pass ``device="cuda"`` to do the arithmetic on a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tunelab import device as dev
from tunelab.atomic import atomic_directory
from tunelab.errors import TunelabError
from tunelab.export import verify
from tunelab.export.manifest import hash_adapter, hash_model_weights, write_manifest
from tunelab.export.qlora import QloraInfo, detect_qlora, nf4_round_trip
from tunelab.models.decoder import Decoder

log = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What was merged and how closely the result matches base + adapter."""

    out: Path
    dtype: str
    base: str
    adapter: str
    base_precision: str
    prompts: list[str]
    fp32_max_abs_diff: float  # merged fp32 vs base + adapter (fp32)
    fp32_tolerance: float
    cast_error: float  # the base model's own: base in dtype vs base in fp32
    max_abs_diff: float  # merged in dtype vs base + adapter (fp32)
    tolerance: float
    adapter_effect: float  # base + adapter vs base, both fp32
    base_sha256: str = ""
    adapter_sha256: str = ""
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line with the output, dtype and the verification figures."""
        return (
            f"merged into {self.out} ({self.dtype}, {self.base_precision}); logits vs "
            f"base+adapter: max |diff| {self.max_abs_diff:.3g} <= {self.tolerance:.3g} "
            f"(fp32 merge {self.fp32_max_abs_diff:.3g} <= {self.fp32_tolerance:.3g}; "
            f"adapter effect {self.adapter_effect:.3g})"
        )


def merge_adapter(
    base_spec: str,
    adapter_dir: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    overwrite: bool = False,
    prompts: list[str] | None = None,
    device: str | None = "cpu",
    qlora: str = "auto",
) -> MergeReport:
    """Merge the PEFT LoRA adapter in ``adapter_dir`` into ``base_spec`` and write ``out``.

    ``dtype``: bf16 / fp16 / fp32 of the written weights. ``prompts``: user messages for the
    logit check (default ``verify.DEFAULT_PROMPTS``). ``qlora``: auto / yes / no, see
    ``tunelab.export.qlora``. Raises TunelabError, writing nothing, when the adapter does not
    fit the base, a merged weight overflows ``dtype`` or the logits disagree.
    """
    from tunelab.hub import resolve_model

    out, adapter_dir = Path(out), Path(adapter_dir)
    target = parse_target_dtype(dtype)
    if out.exists() and not overwrite:  # before loading a possibly large model
        raise TunelabError(f"{out} already exists; choose another --out or pass --overwrite.")
    check_adapter_files(adapter_dir)
    base_dir = resolve_model(base_spec)
    tokenizer = adapter_tokenizer(adapter_dir, base_dir)
    info = detect_qlora(adapter_dir, qlora)
    prompts = list(prompts or verify.DEFAULT_PROMPTS)

    model = load_base(base_dir, device, info, allow_fallback=True)
    ids = verify.encode_prompts(tokenizer, prompts)
    base_logits = verify.prompt_logits(model, ids)
    cast_error = 0.0
    if target != torch.float32:
        cast_error = verify.max_abs_diff(
            verify.prompt_logits(verify.clone_in_dtype(model, target), ids), base_logits
        )
    reference, fp32_diff, fp32_tol = merge_into(model, adapter_dir, ids, target)
    merged = model if target == torch.float32 else verify.clone_in_dtype(model, target)
    del model
    tol = verify.dtype_tolerance(target, cast_error, fp32_tol)
    diff = verify.max_abs_diff(verify.prompt_logits(merged, ids), reference)
    if not diff <= tol:
        raise TunelabError(_dtype_failure(dtype, diff, tol, cast_error))

    report = MergeReport(
        out=out,
        dtype=dtype,
        base=str(base_spec),
        adapter=str(adapter_dir),
        base_precision=info.describe(),
        prompts=prompts,
        fp32_max_abs_diff=fp32_diff,
        fp32_tolerance=fp32_tol,
        cast_error=cast_error,
        max_abs_diff=diff,
        tolerance=tol,
        adapter_effect=verify.max_abs_diff(reference, base_logits),
        base_sha256=hash_model_weights(base_dir),
        adapter_sha256=hash_adapter(adapter_dir),
    )
    if target != torch.float32 and report.adapter_effect < cast_error:
        report.warnings.append(
            f"the adapter changes logits by {report.adapter_effect:.3g}, less than {dtype} "
            f"rounding does ({cast_error:.3g}): part of it may be lost; consider --dtype fp32."
        )
    for w in report.warnings:
        log.warning(w)
    write_model_dir(merged, tokenizer, base_dir, out, target, overwrite, _manifest(report))
    log.info(report.summary())
    return report


def merge_into(
    model: Decoder, adapter_dir: Path, ids: list[list[int]], target: torch.dtype = torch.float32
) -> tuple[list[torch.Tensor], float, float]:
    """Apply the adapter, merge it in place (fp32) and check the logits didn't move.

    Every merged tensor must also fit ``target`` (the dtype it will be saved in). Returns
    (base + adapter logits, merged-vs-unmerged max |diff|, its tolerance); raises when the
    merged model does not compute what base + adapter computes.
    """
    from tunelab.models.lora import remove_lora
    from tunelab.models.peft_io import load_adapter

    assert model.dtype == torch.float32, "merge in fp32"
    load_adapter(model, adapter_dir)
    reference = verify.prompt_logits(model, ids)
    remove_lora(model, merge=True)  # refuses inf/NaN, naming the layer
    check_range(model, target)
    tol = verify.fp32_tolerance(reference)
    diff = verify.max_abs_diff(verify.prompt_logits(model, ids), reference)
    if not diff <= tol:
        raise TunelabError(
            f"merge check failed: the merged fp32 model differs from base + adapter by "
            f"{diff:.3g} (tolerance {tol:.3g}); nothing was written. The adapter uses "
            "something the merge does not reproduce; report this with the adapter config."
        )
    return reference, diff, tol


def parse_target_dtype(dtype: str) -> torch.dtype:
    """bf16 / fp16 / fp32 (no "auto": the output dtype must be chosen)."""
    parsed = dev.parse_dtype(dtype)
    if parsed is None:
        raise TunelabError("the output dtype must be bf16, fp16 or fp32 (not auto).")
    return parsed


def check_adapter_files(adapter_dir: Path) -> None:
    """Fail early (before loading the base) on a missing adapter config or weights file."""
    from tunelab.models.peft_io import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, read_adapter_config

    if not adapter_dir.is_dir():
        raise TunelabError(
            f"adapter directory {adapter_dir} does not exist; pass the directory holding "
            "adapter_config.json and adapter_model.safetensors (a training run's final/)."
        )
    read_adapter_config(adapter_dir)
    if not any((adapter_dir / f).is_file() for f in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN)):
        raise TunelabError(
            f"{adapter_dir} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}); the adapter "
            "is incomplete. Point --adapter at a complete adapter directory."
        )


def adapter_tokenizer(adapter_dir: Path, base_dir: Path):
    """The tokenizer saved with the adapter (its chat template is the trained one), else the
    base model's."""
    from tunelab.models.loading import TOKENIZER_FILES, load_tokenizer

    has_own = any((Path(adapter_dir) / f).exists() for f in TOKENIZER_FILES)
    return load_tokenizer(adapter_dir if has_own else base_dir)


def check_range(model: Decoder, dtype: torch.dtype, what: str = "merged weight") -> None:
    """Every weight is finite and representable in ``dtype``; else an error naming it."""
    limit = torch.finfo(dtype).max
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():  # integer / boolean buffers of transformers models
            continue
        if not torch.isfinite(tensor).all():
            if what == "merged weight":
                cause = "the adapter is broken (check the training loss for divergence)"
            elif name == "fp16":  # loaded straight into fp16: an overflow shows up as inf
                cause = "a value beyond fp16's range (65504) or a broken source; use --dtype bf16"
            else:
                cause = "the source model is broken"
            raise TunelabError(f"{what} {key} has inf/NaN values; {cause}. Nothing was written.")
        peak = float(tensor.abs().max())
        if peak > limit:
            hint = "use --dtype bf16 (same range as fp32)" if name == "fp16" else "use fp32"
            raise TunelabError(
                f"{what} {key} reaches {peak:.3g}, beyond the {name} maximum "
                f"{limit:.3g}: it would overflow to inf; {hint}. Nothing was written."
            )


def write_model_dir(
    model: Decoder,
    tokenizer,
    base_dir: Path,
    out: Path,
    dtype: torch.dtype,
    overwrite: bool,
    manifest: dict,
) -> Path:
    """Our ``save_pretrained`` + licence/model card + ``tunelab.json``, all or nothing."""
    from tunelab.models.loading import copy_extra_files, read_generation_config, save_pretrained

    gen = read_generation_config(base_dir) or None
    with atomic_directory(out, overwrite=overwrite) as tmp:
        # save_pretrained is atomic by itself: it builds a sibling and renames it onto `tmp`,
        # so the manifest can join it before the outer rename publishes `out`.
        save_pretrained(model, tokenizer, tmp, dtype, overwrite=True, generation_config=gen)
        copy_extra_files(base_dir, tmp)
        write_manifest(tmp, manifest)
    return out


def load_base(
    base_dir: Path, device: str | None, info: QloraInfo, allow_fallback: bool = False
) -> Decoder:
    """The base in fp32: as stored, or rebuilt as the NF4 base a QLoRA adapter saw.

    ``allow_fallback``: an architecture our decoder does not implement loads as a
    transformers model (``hf_fallback``), as it was trained; otherwise it is an error.
    """
    from tunelab.models import hf_fallback
    from tunelab.models.loading import load_model

    if allow_fallback and hf_fallback.needs_fallback(base_dir):
        device = dev.resolve_device(device or "cpu")
        model = hf_fallback.load_hf_model(base_dir, device, torch.float32, purpose="merging")
    else:
        model = load_model(base_dir, device=device or "cpu", dtype=torch.float32)
    if info.qlora:
        nf4_round_trip(model, info.base_dtype or stored_dtype(base_dir))
    return model


def stored_dtype(base_dir: Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in (its config.json), fp32 if unsaid."""
    import json

    raw = json.loads((Path(base_dir) / "config.json").read_text())
    return dev.parse_dtype(str(raw.get("dtype") or raw.get("torch_dtype") or "fp32"))


def _dtype_failure(dtype: str, diff: float, tol: float, cast_error: float) -> str:
    if diff == float("inf"):
        why = (
            f"the merged model gives inf/NaN logits in {dtype} (activations overflow); "
            "use --dtype bf16 or fp32"
        )
    else:
        why = (
            f"the merged model in {dtype} differs from base + adapter by {diff:.3g}, more than "
            f"the tolerance {tol:.3g} ({verify.HALF_CAST_FACTOR:g} x the base model's own "
            f"{dtype} rounding, {cast_error:.3g}); use --dtype bf16 or fp32"
        )
    return f"merge check failed: {why}. Nothing was written."


def _manifest(report: MergeReport) -> dict:
    data = asdict(report)
    return {
        "kind": "merged-lora",
        "base": {"spec": data["base"], "sha256": data["base_sha256"]},
        "adapter": {"path": data["adapter"], "sha256": data["adapter_sha256"]},
        "dtype": data["dtype"],
        "base_precision": data["base_precision"],
        "hash": "sha256 over name:size + full bytes of each weight file, in order",
        "verification": {
            "prompts": data["prompts"],
            "max_abs_diff": data["max_abs_diff"],
            "tolerance": data["tolerance"],
            "fp32_max_abs_diff": data["fp32_max_abs_diff"],
            "fp32_tolerance": data["fp32_tolerance"],
            "base_cast_error": data["cast_error"],
            "adapter_effect": data["adapter_effect"],
            "metric": "max |logit difference| over all positions of the chat-templated prompts",
        },
        "warnings": data["warnings"],
    }
