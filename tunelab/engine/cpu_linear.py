"""Pre-packed (oneDNN) linear weights for bf16 inference on CPU.

A plain bf16 ``F.linear`` on CPU re-lays the weight out for the matmul kernel (AMX / AVX512
tiles) on every call. Decode steps multiply few rows by every weight of the model, so that
reorder is most of the cost: packing each weight once at engine start makes the matmuls of
a 32-row decode step about 1.4x faster (docs/engine.md, "Performance (CPU)"). Long prefill
chunks gain nothing from it (measured), so calls with more than ``PACKED_MAX_ROWS`` rows
take the plain path.

The packed copy is extra memory (the size of the linear weights), so the engine packs only
when it fits easily (``pack_linears``). A packed layer keeps its ``weight`` Parameter: names,
``state_dict`` and LoRA see the layer unchanged, and a weight changed in place after packing
is noticed (its version counter), as is one replaced (``load_state_dict(assign=True)``), and
packed again.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from tunelab import device as dev

log = logging.getLogger(__name__)

PACKED_MAX_ROWS = 64  # rows per call up to which the packed weight pays (decode batches)
MAX_RAM_SHARE = 0.25  # pack only if the copies take at most this share of available RAM


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed weights pay here: CPU, bf16, bf16 matmul hardware and oneDNN's ops."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return False
    if dev.cpu_bf16_matmul() is None or not torch.backends.mkldnn.is_available():
        return False
    try:  # private ops: check they exist and agree with F.linear before relying on them
        w = torch.randn(24, 40, dtype=dtype)
        x = torch.randn(3, 40, dtype=dtype)
        got = _packed_linear(x, _pack(w), None)
        return torch.allclose(got.float(), F.linear(x, w).float(), atol=0.05, rtol=0.02)
    except Exception as e:  # a torch without them: stay on the plain path
        log.info("packed CPU linears unavailable (%s: %s)", type(e).__name__, e)
        return False


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_MAX_ROWS // 2)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedWeight:
    """A linear layer's weight packed for oneDNN, repacked when the weight changes.

    Copies and pickles carry the weight only; the packed copy (an opaque oneDNN tensor, which
    neither deepcopy nor pickle can handle) is made again on first use.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight: torch.Tensor = weight
        self.packed: torch.Tensor | None = None
        self.stamp: tuple | None = None

    def refresh(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight``, packed again if it is new, replaced (assign=True,
        ``.weight = ...``) or changed in place since the last call."""
        stamp = id(weight), weight.data_ptr(), weight._version
        if stamp != self.stamp:
            self.weight, self.packed, self.stamp = weight, _pack(weight), stamp
        return self.packed

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``x @ weight^T + bias`` from the packed copy of ``weight`` (the layer's current one),
        or None where the plain path must run."""
        if x.dtype != weight.dtype or x.numel() > PACKED_MAX_ROWS * weight.shape[1]:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return None  # the packed op has no backward
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            return None  # moved or cast since it was packed
        if weight.is_inference():  # no version counter: an in-place change would go unseen
            return None
        return _packed_linear(x, self.refresh(weight), bias)

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        return PackedWeight(copy.deepcopy(self.weight, memo))

    def __getstate__(self) -> dict:
        return {"weight": self.weight}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["weight"])


class PackedLinear(nn.Linear):
    """``nn.Linear`` that multiplies small batches with its pre-packed weight.

    It adopts the base layer's ``weight`` and ``bias`` Parameters (no copy of them).
    """

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear.__init__: that would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.packed = PackedWeight(base.weight)
        if not base.weight.is_inference():  # (inference tensors always take the plain path)
            self.packed.refresh(base.weight)  # now, not on the first call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer``'s base linear of ``x``: packed where ``layer`` carries a packed weight."""
    packed: PackedWeight | None = getattr(layer, "packed", None)
    out = packed.linear(x, layer.weight, layer.bias) if packed is not None else None
    return F.linear(x, layer.weight, layer.bias) if out is None else out


def pack_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` by a ``PackedLinear``; bytes added.

    Packs nothing (returns 0) where it does not pay (``packing_supported``) or when the
    copies would take more than ``MAX_RAM_SHARE`` of the available RAM.
    """
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if not linears:
        return 0
    weight = linears[0][1].weight
    if not packing_supported(weight.device, weight.dtype):
        return 0
    extra = sum(m.weight.numel() * m.weight.element_size() for _, m in linears)
    available, _ = dev.mem_get_info(weight.device)
    if extra > MAX_RAM_SHARE * available:
        log.info(
            "packed CPU linears skipped: they need %.1f GiB, %.1f GiB available",
            extra / 2**30,
            available / 2**30,
        )
        return 0
    for name, m in linears:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear(m))
    log.info("packed %d CPU linears for bf16 inference (%.2f GiB)", len(linears), extra / 2**30)
    return extra
