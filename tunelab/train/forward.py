"""What the training loop needs from a model: hidden states of a batch and the output head.

Our ``Decoder`` gets attention contexts with document masks; a transformers model (the
fallback for other architectures, ``tunelab.models.hf_fallback``) gets its own ``HFForward``.
The loop only calls ``hidden(batch)``, ``head()`` and reads ``flops_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tunelab.models.decoder import Decoder
from tunelab.train.batching import attention_for
from tunelab.train.loss import OutputHead


class ForwardPath(Protocol):
    flops_config: Any  # the dimensions metrics.flops_per_token reads

    def hidden(self, batch) -> torch.Tensor: ...

    def head(self) -> OutputHead: ...


@dataclass
class DecoderForward:
    """Our decoder: packed rows get a same-document mask, padded rows plain causal."""

    model: Decoder
    packing: bool
    windows: set[int | None] = field(init=False)

    def __post_init__(self) -> None:
        self.windows = {layer.self_attn.window for layer in self.model.model.layers}

    def hidden(self, batch) -> torch.Tensor:
        attn = attention_for(batch, self.windows, self.packing)
        return self.model.model(batch.input_ids, batch.position_ids, attn=attn)

    def head(self) -> OutputHead:
        return OutputHead(self.model.lm_head.weight)

    @property
    def flops_config(self):
        return self.model.config


def forward_for(model: torch.nn.Module, packing: bool) -> ForwardPath:
    """The forward path of ``model`` (our decoder or a transformers model)."""
    if isinstance(model, Decoder):
        return DecoderForward(model, packing)
    from tunelab.models.hf_fallback import HFForward

    return HFForward(model, packing)
