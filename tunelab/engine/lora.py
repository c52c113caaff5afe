"""Per-request LoRA adapters: the engine's registry of loaded adapters (name -> slot).

Adapters are PEFT-format directories (``adapter_config.json`` + ``adapter_model.safetensors``:
what ``tunelab train`` and ``peft`` write), read with ``tunelab.models.peft_io`` and checked
against the model before anything changes. The first adapter replaces the targeted linears
with ``MultiLoraLinear`` (an engine that never loads one runs the plain model). Each loaded
adapter gets a slot in those layers and a unique id that salts the prefix-cache keys, so KV
blocks are never shared across adapters (nor with an earlier adapter of the same name).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.engine.cpu_linear import PackedLinear
from tunelab.engine.lora_layers import LoraStep, MultiLoraLinear
from tunelab.engine.sequence import Sequence
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder
from tunelab.models.lora import LoraConfig, candidate_linears, lora_modules, select_targets
from tunelab.models.peft_io import lora_key_parts, read_adapter_config, read_adapter_weights

log = logging.getLogger(__name__)

DEFAULT_MAX_LORA_RANK = 64


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter in the engine: its slot in the LoRA layers and its prefix-cache id."""

    name: str
    path: str
    slot: int
    uid: int  # unique per load: part of the prefix-cache key
    rank: int
    scaling: float
    modules: tuple[str, ...]
    chat_template: str | None = None  # the adapter's own, when it differs from the base's


def read_adapter(
    model: Decoder,
    linears: dict[str, nn.Linear],
    name: str,
    path: str | Path,
    max_rank: int,
) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read and check a PEFT adapter for ``model``: its config and ``{module: (A, B)}``.

    ``linears`` are the model's LoRA-capable layers by name (``candidate_linears``). Every
    problem raises a TunelabError naming the adapter: a missing or unsupported config, a
    rank above ``max_rank``, tensors for layers the model lacks, wrong shapes (another base
    model), tensors missing for a target.
    """
    where = f"adapter {name!r} ({path})"
    path = Path(path)
    try:
        cfg = read_adapter_config(path)
        try:
            targets = select_targets(model, cfg.targets)
        except TunelabError as e:  # its layers are not this model's
            raise TunelabError(f"{e} Was the adapter trained on another base model?") from None
        raw = read_adapter_weights(path)
    except TunelabError as e:
        raise TunelabError(f"{where}: {e}") from None
    if cfg.rank > max_rank:
        raise TunelabError(
            f"{where} has rank {cfg.rank}, above this engine's max_lora_rank={max_rank}: "
            f"start the engine with max_lora_rank >= {cfg.rank} (serve: --max-lora-rank)."
        )
    weights: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in raw.items():
        parts = lora_key_parts(key)
        if parts is None or parts[0] not in linears:
            raise TunelabError(
                f"{where}: tensor {key} names no LoRA layer of this model (layers look like "
                f"{next(iter(linears))}); the adapter was made for another model."
            )
        module, ab = parts
        base = linears[module]
        want = (cfg.rank, base.in_features) if ab == "A" else (base.out_features, cfg.rank)
        if tuple(tensor.shape) != want:
            raise TunelabError(
                f"{where}: tensor {key} has shape {tuple(tensor.shape)}, this model needs "
                f"{want}: the adapter was trained on a different base model."
            )
        weights[(module, ab)] = tensor
    missing = [f"{m}.lora_{ab}.weight" for m in targets for ab in "AB" if (m, ab) not in weights]
    extra = sorted({m for m, _ in weights} - set(targets))
    if missing or extra:
        raise TunelabError(
            f"{where}: the weights do not match its target_modules (missing {missing[:3]}, "
            f"not targeted {extra[:3]}); the adapter files are inconsistent."
        )
    bad = [k for k, t in weights.items() if not torch.isfinite(t).all()]
    if bad:
        m, ab = bad[0]
        raise TunelabError(f"{where}: {m}.lora_{ab}.weight holds inf/NaN; the adapter is broken.")
    return cfg, {m: (weights[(m, "A")], weights[(m, "B")]) for m in targets}


def own_chat_template(adapter_dir: Path) -> str | None:
    """The chat template saved beside an adapter (with its tokenizer), if any."""
    from tunelab.models.loading import TOKENIZER_FILES, load_tokenizer

    if not any((adapter_dir / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        template = getattr(load_tokenizer(adapter_dir), "chat_template", None)
    except TunelabError as e:  # e.g. a tokenizer_config.json alone: the weights still serve
        log.warning(
            "%s: its tokenizer files do not load (%s); using the base's template", adapter_dir, e
        )
        return None
    return template.get("default") if isinstance(template, dict) else template


class LoraRegistry:
    """The adapters loaded into one engine's model, and the step's adapter groups."""

    def __init__(self, model: Decoder, max_rank: int = DEFAULT_MAX_LORA_RANK):
        if max_rank < 1:
            raise TunelabError(f"max_lora_rank must be >= 1, got {max_rank}.")
        if lora_modules(model):
            raise TunelabError(
                "the model has training LoRA layers: merge or remove them "
                "(tunelab.models.lora.remove_lora) before serving it."
            )
        self.model, self.max_rank = model, max_rank
        self.linears = candidate_linears(model)  # before any wrapping: the base layers
        self.layers: dict[str, MultiLoraLinear] = {}
        self.adapters: dict[str, LoadedAdapter] = {}
        self.step = LoraStep()
        self._uids = itertools.count(1)

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def get(self, name: str) -> LoadedAdapter:
        """The adapter called ``name``; an unknown name raises with the ones available."""
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join(repr(n) for n in self.adapters) or "none"
            raise TunelabError(
                f"unknown LoRA adapter {name!r} (loaded: {known}); load it first "
                "(LLM(adapters={...}), load_adapter, or serve --adapter NAME=PATH)."
            )
        return adapter

    def load(
        self, name: str, path: str | Path, base_chat_template: str | None = None
    ) -> LoadedAdapter:
        """Read, check and load the PEFT adapter at ``path`` as ``name``.

        An adapter saved with its own tokenizer (tunelab's trainer does) keeps that chat
        template: chat requests on it are rendered as it was trained.
        """
        if not name:
            raise TunelabError("an adapter needs a non-empty name.")
        if name in self.adapters:
            raise TunelabError(
                f"an adapter named {name!r} is already loaded (from "
                f"{self.adapters[name].path}); unload it first or pick another name."
            )
        cfg, weights = read_adapter(self.model, self.linears, name, path, self.max_rank)
        used = {a.slot for a in self.adapters.values()}
        slot = next(i for i in itertools.count() if i not in used)
        template = own_chat_template(Path(path))  # before any layer changes
        layers = {module: self._layer(module) for module in weights}  # refusals raise here
        try:
            for module, (a, b) in weights.items():
                layers[module].set_slot(slot, a, b, cfg.scaling)
        except BaseException:  # (out of memory growing the stacks): leave the slot clean
            for layer in layers.values():
                layer.clear_slot(slot)
            raise
        adapter = LoadedAdapter(
            name,
            str(path),
            slot,
            next(self._uids),
            cfg.rank,
            cfg.scaling,
            tuple(weights),
            template if template != base_chat_template else None,
        )
        self.adapters[name] = adapter
        log.info(
            "loaded LoRA adapter %r from %s (rank %d, %d layers, slot %d)",
            name, path, cfg.rank, len(weights), slot,
        )  # fmt: skip
        return adapter

    def unload(self, name: str) -> None:
        """Forget ``name``; its slot is free for the next adapter."""
        adapter = self.get(name)
        for module in adapter.modules:
            self.layers[module].clear_slot(adapter.slot)
        del self.adapters[name]

    def _layer(self, module: str) -> MultiLoraLinear:
        """The ``MultiLoraLinear`` at ``module``, replacing the base linear the first time."""
        layer = self.layers.get(module)
        if layer is None:
            base = self.linears[module]
            if type(base) not in (nn.Linear, PackedLinear):
                raise TunelabError(
                    f"cannot apply LoRA adapters to {module}: it is a {type(base).__name__}, "
                    "not a plain linear layer (serve adapters on an unquantized model)."
                )
            parent, attr = module.rsplit(".", 1)
            layer = MultiLoraLinear(base, self.step)
            setattr(self.model.get_submodule(parent), attr, layer)
            self.layers[module] = layer
        return layer

    @contextmanager
    def step_for(
        self, seqs: list[Sequence], counts: list[int], device: torch.device
    ) -> Iterator[None]:
        """While inside, the LoRA layers know which of the step's flattened rows
        (``seqs[i]`` runs ``counts[i]`` tokens, in that order) use which adapter.

        Afterwards the layers compute the base model again (as for a step without adapter
        tokens), so the model stays usable outside the engine.
        """
        if any(seq.lora_slot >= 0 for seq in seqs):
            slots = [s.lora_slot for s, n in zip(seqs, counts, strict=True) for _ in range(n)]
            self.step.set(slots, device)
        try:
            yield
        finally:
            self.step.clear()
