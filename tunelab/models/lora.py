"""LoRA adapters on the decoder's linear layers (PEFT-format I/O lives in ``peft_io``).

One adapter per layer ("default" in PEFT's terms). A wrapped layer keeps its base under
``.base``: call ``remove_lora`` before ``save_pretrained``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder


@dataclass
class LoraConfig:
    """Rank, scaling and targets of a LoRA adapter.

    ``targets``: "all-linear" (every linear in the decoder layers, not ``lm_head``), short or
    full module names (``["q_proj", "v_proj"]``, matched as a name suffix like PEFT), or one
    regular expression that must match whole module names (PEFT's string form).
    """

    rank: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: list[str] | str = "all-linear"
    use_rslora: bool = False
    extra: dict = field(default_factory=dict, repr=False)  # other adapter_config.json fields

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise TunelabError(f"LoRA rank must be positive (got {self.rank}); try 8 or 16.")
        if not 0.0 <= self.dropout < 1.0:
            raise TunelabError(f"LoRA dropout must be in [0, 1) (got {self.dropout}).")

    @property
    def scaling(self) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (keeps updates stable at high rank)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoraLinear(nn.Module):
    """``base(x) + lora_B(lora_A(dropout(x))) * scaling`` around a frozen linear layer."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig, name: str = ""):
        super().__init__()
        self.base, self.name, self.scaling = base, name, cfg.scaling
        self.merged = False
        # A quantized (NF4) base reports its original dtype here.
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, cfg.rank, bias=False, **kw)
        self.lora_B = nn.Linear(cfg.rank, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)  # the adapter starts as a no-op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        a = self.lora_A.weight
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling
        return result + lora.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A in fp32 (what merging adds to the base weight)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the adapter into the base weight (in fp32, cast back); refuses inf/NaN."""
        if not self.merged:
            self._set_base(self._plain_weight().float() + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again (exact up to rounding)."""
        if self.merged:
            self._set_base(self._plain_weight().float() - self.delta_weight())
            self.merged = False

    def _plain_weight(self) -> torch.Tensor:
        if getattr(self.base, "quantized", False):
            raise TunelabError(
                f"cannot merge LoRA into the 4-bit base of {self.name}: dequantize it first "
                "(tunelab.models.quant.dequantize_nf4), or merge into the unquantized base model."
            )
        return self.base.weight

    def _set_base(self, new: torch.Tensor) -> None:
        new = new.to(self.base.weight.dtype)  # check after the cast: fp16 overflows to inf
        if not torch.isfinite(new).all():
            raise TunelabError(
                f"merging LoRA into {self.name} gives inf/NaN weights; the adapter is broken "
                "(check the training loss for divergence) or too large for the base dtype."
            )
        self.base.weight.copy_(new)


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module name (``model.layers.0.self_attn.q_proj``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def candidate_linears(model: Decoder | nn.Module) -> dict[str, nn.Linear]:
    """Linear layers LoRA can wrap: every ``nn.Linear`` inside the decoder layers.

    The layers are ``model.layers`` in our decoder, wherever transformers keeps its blocks
    in a fallback model (``hf_fallback.decoder_layers``); the output head is never one.
    A wrapped layer counts under its own name (its base linear); LoRA's A/B are not targets.
    """
    from tunelab.models.hf_fallback import decoder_layers

    prefix, layers = decoder_layers(model)
    found: dict[str, nn.Linear] = {}
    for name, m in layers.named_modules(prefix=prefix):
        if isinstance(m, LoraLinear):
            found[name] = m.base
        elif isinstance(m, nn.Linear) and name.rsplit(".", 1)[0] not in found:
            found[name] = m
    return found


def select_targets(model: Decoder, targets: list[str] | str) -> list[str]:
    """Module names matched by ``targets`` (see LoraConfig); unknown names raise."""
    names = list(candidate_linears(model))
    if not names:  # e.g. GPT-2 through transformers: its blocks use Conv1D, not nn.Linear
        raise TunelabError(
            f"{type(model).__name__} has no nn.Linear layers in its decoder blocks for LoRA "
            "to wrap; use method full or freeze for this model."
        )
    valid = sorted({n.rsplit(".", 1)[-1] for n in names})
    hint = f"valid targets: all-linear, {', '.join(valid)} (or full module names)"
    if targets == "all-linear":
        return names
    if isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
        if not chosen and re.fullmatch(r"\w+", targets) and targets in valid:
            return select_targets(model, [targets])  # `--lora.targets q_proj`: a name
        if not chosen:
            raise TunelabError(f"LoRA target pattern {targets!r} matches no layer; {hint}.")
        return chosen
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown or not targets:
        raise TunelabError(f"unknown LoRA target(s) {unknown or targets}; {hint}.")
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def apply_lora(model: Decoder, cfg: LoraConfig) -> list[str]:
    """Wrap the target linears in ``LoraLinear`` in place and freeze everything else.

    Returns the wrapped module names. Only the LoRA A/B weights stay trainable.
    """
    if lora_modules(model):
        raise TunelabError("the model already has LoRA layers; call remove_lora(model) first.")
    names = select_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoraLinear(getattr(parent, attr), cfg, name))
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": ..., "<module>.lora_B.weight": ...}`` (our names)."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return state


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight counts its logical elements."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight; all or nothing (a failure unmerges)."""
    done: list[LoraLinear] = []
    try:
        for m in lora_modules(model).values():
            if not m.merged:
                m.merge()
                done.append(m)
    except TunelabError:
        for m in done:
            m.unmerge()
        raise


def unmerge_lora(model: nn.Module) -> None:
    """Take merged adapters out of the base weights again."""
    for m in lora_modules(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool) -> None:
    """Replace each ``LoraLinear`` by its base linear, with the adapter merged in or dropped."""
    if merge:
        merge_lora(model)
    else:
        unmerge_lora(model)
    for name, m in lora_modules(model).items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, m.base)
