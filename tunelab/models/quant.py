"""4-bit NF4 storage of the frozen base weights for QLoRA, on torchao's ``NF4Tensor``.

``quantize_base_nf4`` swaps the linear layers inside the decoder layers (LoRA's targets,
wrapped or not) for ``NF4Linear``; embeddings, norms and ``lm_head`` stay as they are. The
weight is dequantized per matmul (torchao's ``linear_nf4``), so activations and LoRA weights
keep the model's dtype. ``dequantize_nf4`` turns the base back into plain linears, which is
what merging a QLoRA adapter needs (merge in higher precision, not into 4 bits).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from tunelab import device as dev
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder

log = logging.getLogger(__name__)

BLOCK_SIZE = 64  # values per absmax scale (QLoRA's choice)
SCALER_BLOCK_SIZE = 256  # scales per double-quantization block, reduced to fit small tensors


def _torchao() -> SimpleNamespace:
    """torchao's NF4 pieces; the module moved in torchao 0.15."""
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as mod
    except ImportError:
        try:
            from torchao.dtypes import nf4tensor as mod
        except ImportError as e:
            raise TunelabError("QLoRA needs torchao: pip install torchao") from e
    return SimpleNamespace(NF4Tensor=mod.NF4Tensor, to_nf4=mod.to_nf4, linear_nf4=mod.linear_nf4)


def is_nf4(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torchao NF4Tensor (without importing torchao)."""
    return type(t).__name__ == "NF4Tensor"


class NF4Linear(nn.Linear):
    """Frozen linear layer with an NF4 weight, dequantized to the input's dtype per matmul.

    A subclass of ``nn.Linear`` so that LoRA wraps it like any linear; ``quantized`` tells
    ``LoraLinear.merge`` to refuse.
    """

    quantized = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        nn.Module.__init__(self)  # skip nn.Linear's allocation and init
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._linear_nf4 = _torchao().linear_nf4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear_nf4(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


@dataclass
class QuantReport:
    """What ``quantize_base_nf4`` did: layers quantized/skipped, base weight bytes."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor; an NF4Tensor counts its packed data, scales and table."""
    if is_nf4(t):
        inner = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
        return sum(x.numel() * x.element_size() for x in inner)
    return t.numel() * t.element_size()


def _base_linears(model: Decoder) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(name, parent, attribute, linear) for each base linear in the decoder layers.

    A LoRA-wrapped layer contributes its ``.base`` under the wrapper's name; the LoRA A/B
    linears are not base weights.
    """
    found = []
    for name, parent in model.model.layers.named_modules(prefix="model.layers"):
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear) and attr not in ("lora_A", "lora_B"):
                full = name if attr == "base" else f"{name}.{attr}"
                found.append((full, parent, attr, child))
    return found


def nf4_numel(model: Decoder) -> int:
    """Elements ``quantize_base_nf4`` would store in NF4 (works on a meta model too)."""
    return sum(
        lin.weight.numel()
        for *_, lin in _base_linears(model)
        if lin.weight.numel() % BLOCK_SIZE == 0
    )


def base_weight_bytes(model: Decoder) -> int:
    """Bytes held by the weights of the base linears in the decoder layers."""
    return sum(tensor_bytes(lin.weight) for *_, lin in _base_linears(model))


def _scaler_block_size(numel: int) -> int:
    # torchao needs the number of 64-value blocks to divide into scaler blocks.
    return math.gcd(numel // BLOCK_SIZE, SCALER_BLOCK_SIZE)


@torch.no_grad()
def quantize_base_nf4(
    model: Decoder, device: str | torch.device, announce: bool = True
) -> QuantReport:
    """Store the decoder layers' linear weights in NF4 on ``device``; freeze them.

    Each weight is moved to ``device`` and quantized one at a time (a bf16 model on the CPU
    never has to fit on the accelerator), then the rest of the model follows. Weights whose
    size is not a multiple of 64 stay unquantized (listed in ``QuantReport.skipped``).
    """
    dev.require("qlora_nf4", device)
    ao = _torchao()
    device = dev.resolve_device(device)
    report = QuantReport()
    for name, parent, attr, lin in _base_linears(model):
        report.bytes_before += tensor_bytes(lin.weight)
        if is_nf4(lin.weight) or lin.weight.numel() % BLOCK_SIZE:
            if not is_nf4(lin.weight):
                report.skipped.append(name)
            report.bytes_after += tensor_bytes(lin.weight)
            continue
        w = lin.weight.detach().to(device).contiguous()
        q = ao.to_nf4(w, BLOCK_SIZE, _scaler_block_size(w.numel()))
        bias = None if lin.bias is None else lin.bias.detach().to(device)
        setattr(parent, attr, NF4Linear(q, bias))
        report.quantized.append(name)
        report.bytes_after += tensor_bytes(q)
    if report.skipped:
        log.warning("kept %d layers unquantized (size not a multiple of 64)", len(report.skipped))
    model.to(device)
    if announce:
        log.info(
            "NF4: %d layers, base weights %.1f MB -> %.1f MB",
            len(report.quantized),
            report.bytes_before / 1e6,
            report.bytes_after / 1e6,
        )
    return report


@torch.no_grad()
def dequantize_nf4(model: Decoder, dtype: torch.dtype | None = None) -> int:
    """Replace every ``NF4Linear`` by a plain frozen ``nn.Linear`` in ``dtype``.

    ``dtype`` defaults to the dtype the weight had before quantization. Returns the number of
    layers converted.
    """
    count = 0
    for _, parent, attr, lin in _base_linears(model):
        if not isinstance(lin, NF4Linear):
            continue
        w = lin.weight.get_original_weight().to(dtype or lin.weight.dtype)
        plain = nn.Linear(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            device="meta",
        )
        plain.weight = nn.Parameter(w, requires_grad=False)
        if lin.bias is not None:
            plain.bias = nn.Parameter(lin.bias.detach().to(w.dtype), requires_grad=False)
        setattr(parent, attr, plain)
        count += 1
    return count
