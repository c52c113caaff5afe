"""LoRA adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Our module names are HF's, so a PEFT adapter's keys (``base_model.model.<module>.lora_A.weight``)
and ``target_modules`` apply to the decoder unchanged, both ways.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tunelab.atomic import atomic_directory
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder
from tunelab.models.lora import (
    LoraConfig,
    apply_lora,
    candidate_linears,
    lora_modules,
    lora_state_dict,
    select_targets,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT versions
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)


def _peft_targets(model: Decoder, names: list[str]) -> list[str] | str:
    """Short names when they pick exactly ``names`` (the usual case), else an exact regex."""
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    if select_targets(model, short) == names:
        return short
    return "|".join(re.escape(n) for n in names)


# Written explicitly so that older peft versions, whose defaults differ, read the same adapter.
PEFT_FIXED = {
    "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "revision": None,
}  # fmt: skip


def write_adapter(
    model: Decoder, cfg: LoraConfig, directory: str | Path, base_model_name_or_path: str
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``directory``.

    Not atomic on its own: callers write into a temp dir (``save_adapter``, checkpoints).
    """
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise TunelabError("the model has no LoRA layers to save; call apply_lora first.")
    ranks = {m.lora_A.out_features for m in modules.values()}
    if ranks != {cfg.rank}:
        raise TunelabError(f"LoraConfig.rank={cfg.rank} but the model's LoRA ranks are {ranks}.")
    config = {
        **cfg.extra,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_targets(model, list(modules)),
        "use_rslora": cfg.use_rslora,
        **PEFT_FIXED,
    }
    state = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    directory = Path(directory)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def save_adapter(
    model: Decoder,
    cfg: LoraConfig,
    out_dir: str | Path,
    base_model_name_or_path: str,
    overwrite: bool = False,
) -> Path:
    """Write the adapter as PEFT does, atomically (complete or absent).

    The result loads with ``peft.PeftModel.from_pretrained(hf_model, out_dir)``.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_adapter(model, cfg, tmp, base_model_name_or_path)
    return out_dir


# PEFT options that change what the adapter computes and that we do not implement.
_UNSUPPORTED = (
    "use_dora", "fan_in_fan_out", "lora_bias", "modules_to_save", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "exclude_modules", "target_parameters",
    "trainable_token_indices", "layer_replication", "use_qalora", "alora_invocation_tokens",
)  # fmt: skip


def unsupported_options(raw: dict) -> list[str]:
    """``key=value`` for each adapter_config.json option that changes what the adapter
    computes and that tunelab does not implement (empty: plain LoRA)."""
    bad = [f"{k}={raw[k]!r}" for k in _UNSUPPORTED if raw.get(k) not in (None, False, [], {})]
    if raw.get("bias", "none") != "none":
        bad.append(f"bias={raw['bias']!r}")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        # peft re-runs these inits on load, changing the base weight: A·B on the plain base
        # would compute something else. Convert with peft's path_initial_model_for_weight_
        # conversion (the adapter then applies to the original base).
        bad.append(f"init_lora_weights={init!r} (convert it with peft first)")
    return bad


def read_adapter_config(adapter_dir: str | Path) -> LoraConfig:
    """The ``LoraConfig`` of a PEFT adapter directory; unsupported options raise."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not Path(adapter_dir).exists():
        raise TunelabError(f"adapter directory {adapter_dir} does not exist.")
    if Path(adapter_dir).is_file():
        raise TunelabError(
            f"{adapter_dir} is a file; give the adapter's directory (the one holding "
            f"{ADAPTER_CONFIG})."
        )
    if not path.is_file():
        final = Path(adapter_dir) / "final"
        if (final / ADAPTER_CONFIG).is_file():
            hint = f"this looks like a training run: use {final}"
        elif (Path(adapter_dir) / "config.json").is_file():
            hint = "it holds a whole model (a full or freeze fine-tune): pass it as --model"
        else:
            hint = "give the directory of a LoRA adapter (tunelab train's final/, or peft's)"
        raise TunelabError(
            f"{adapter_dir} is not a PEFT adapter: {ADAPTER_CONFIG} is missing; {hint}."
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"cannot read {path}: {e}") from e
    if raw.get("peft_type") != "LORA":
        raise TunelabError(
            f"{path} describes a {raw.get('peft_type')} adapter; tunelab loads LoRA adapters "
            "only (peft_type LORA)."
        )
    bad = unsupported_options(raw)
    if bad:
        raise TunelabError(
            f"{path} uses PEFT options tunelab does not support: {', '.join(bad)}. Merge it "
            "with peft instead, or retrain with plain LoRA."
        )
    if not raw.get("target_modules"):
        raise TunelabError(f"{path} has no target_modules; it is not a usable LoRA adapter.")
    known = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"}
    return LoraConfig(
        rank=int(raw.get("r", 8)),  # PEFT's defaults
        alpha=raw.get("lora_alpha", 8),
        dropout=float(raw.get("lora_dropout") or 0.0),
        targets=raw["target_modules"],
        use_rslora=bool(raw.get("use_rslora", False)),
        extra={k: v for k, v in raw.items() if k not in known},
    )


def lora_key_parts(key: str) -> tuple[str, str] | None:
    """``(module name, "A" | "B")`` of a PEFT LoRA tensor name, or None for any other tensor."""
    match = _KEY.match(key)
    return (match["module"], match["ab"]) if match else None


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory (safetensors, or the older .bin), on the CPU."""
    st, bin_ = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_WEIGHTS_BIN
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if bin_.is_file():
            return torch.load(bin_, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated file: many exception types
        raise TunelabError(f"cannot read the adapter weights in {adapter_dir}: {e}") from e
    raise TunelabError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN}).")


def load_adapter(model: Decoder, adapter_dir: str | Path) -> LoraConfig:
    """Apply the PEFT LoRA adapter in ``adapter_dir`` to ``model`` and load its weights.

    Everything is checked before the model is touched: unknown modules, missing tensors and
    shapes that belong to another base model raise a TunelabError naming the tensor.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    try:
        targets = select_targets(model, cfg.targets)
    except TunelabError as e:  # its layers are not this model's
        raise TunelabError(f"{e} Was the adapter trained on another base model?") from None
    linears = candidate_linears(model)
    weights = {}
    for key, tensor in read_adapter_weights(adapter_dir).items():
        match = _KEY.match(key)
        if match is None or match["module"] not in linears:
            raise TunelabError(
                f"adapter tensor {key} in {adapter_dir} names no LoRA layer of this model "
                f"(layers look like {targets[0]}); the adapter was made for another model."
            )
        module, ab = match["module"], match["ab"]
        base = linears[module]
        want = (cfg.rank, base.in_features) if ab == "A" else (base.out_features, cfg.rank)
        if tuple(tensor.shape) != want:
            raise TunelabError(
                f"adapter tensor {key} has shape {tuple(tensor.shape)}, this model needs {want}: "
                "the adapter was trained on a different base model."
            )
        weights[(module, ab)] = tensor
    missing = [f"{m}.lora_{ab}.weight" for m in targets for ab in "AB" if (m, ab) not in weights]
    extra = sorted({m for m, _ in weights} - set(targets))
    if missing or extra:
        raise TunelabError(
            f"adapter weights in {adapter_dir} do not match its target_modules: missing "
            f"{missing[:3]}, not targeted {extra[:3]}. The adapter files are inconsistent."
        )
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            m.lora_A.weight.copy_(weights[(name, "A")])
            m.lora_B.weight.copy_(weights[(name, "B")])
    return cfg
