"""Simple batched generation over a contiguous KV cache (no paging, no continuous batching).

Prompts are left-padded to one length, prefilled together, then decoded one token per step.
This is the reference path behind ``tunelab generate`` / ``chat`` until the paged engine
replaces it, and it stays as an oracle for the engine's tests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.engine.detokenizer import TextStream
from tunelab.engine.sampler import SamplingParams, sample_next
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder
from tunelab.models.kv_cache import KVCache

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    prompt_tokens: int


class SimpleGenerator:
    """Generate with a ``Decoder`` and its tokenizer.

    >>> gen = SimpleGenerator.load("default")
    >>> gen.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0))
    """

    def __init__(self, model: Decoder, tokenizer: Any, eos_token_ids: set[int] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids or ())
        if tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)

    @classmethod
    def load(
        cls,
        spec: str = "default",
        device: str | None = None,
        dtype: str | None = None,
        adapter: str | Path | None = None,
    ) -> SimpleGenerator:
        """Resolve a model spec (see ``tunelab.hub``) and load model + tokenizer.

        ``adapter``: a PEFT LoRA adapter directory applied on top, unmerged; its own
        tokenizer (the chat template it was trained with) is used when it has one, and a
        QLoRA adapter gets the NF4-rounded base it was trained on (as ``tunelab merge`` does).
        """
        from tunelab.hub import resolve_model
        from tunelab.models.loading import (
            TOKENIZER_FILES,
            load_model,
            load_tokenizer,
            read_generation_config,
        )

        model_dir = resolve_model(spec)
        tok_dir = model_dir
        if adapter is not None and any((Path(adapter) / f).exists() for f in TOKENIZER_FILES):
            tok_dir = Path(adapter)
        tokenizer = load_tokenizer(tok_dir)
        model = load_model(model_dir, device=device, dtype=dtype)
        if adapter is not None:
            from tunelab.export.qlora import detect_qlora, nf4_round_trip
            from tunelab.models.peft_io import load_adapter

            info = detect_qlora(Path(adapter))
            if info.qlora:
                try:
                    nf4_round_trip(model, info.base_dtype or model.dtype)
                except TunelabError as e:  # no NF4 on this device: the full base is close
                    log.warning("adapter applied to the full-precision base: %s", e)
            cfg = load_adapter(model, adapter)
            log.info("applied LoRA adapter %s (rank %d, unmerged)", adapter, cfg.rank)
        return cls(model, tokenizer, eos_ids_from(read_generation_config(Path(model_dir))))

    # ---- prompts -------------------------------------------------------------------------

    def encode_chat(self, messages: Messages) -> list[int]:
        """Render ``messages`` with the model's own chat template, ready for the answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise TunelabError(
                "this model's tokenizer has no chat template; pass --raw to send plain text."
            )
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    # ---- generation ----------------------------------------------------------------------

    def chat(self, messages: Messages, params: SamplingParams | None = None) -> str:
        return self.generate_ids([self.encode_chat(messages)], params)[0].text

    def complete(self, text: str, params: SamplingParams | None = None) -> str:
        return self.generate_ids([self.encode_text(text)], params)[0].text

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are decoded."""
        params = params or SamplingParams()
        stream = TextStream(self.tokenizer, params.stop)
        for (token,) in self._decode([prompt_ids], params):
            if token is None:
                break
            delta = stream.add(token)
            if delta:
                yield delta
            if stream.stopped:
                return
        tail = stream.finish()
        if tail:
            yield tail

    def generate_ids(
        self, prompts: list[list[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        """Complete a batch of tokenized prompts."""
        params = params or SamplingParams()
        streams = [TextStream(self.tokenizer, params.stop) for _ in prompts]
        tokens: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        done = [False] * len(prompts)
        for step in self._decode(prompts, params):
            for row, token in enumerate(step):
                if done[row]:
                    continue
                if token is None:
                    done[row], reasons[row] = True, "stop"
                    continue
                tokens[row].append(token)
                streams[row].add(token)
                if streams[row].stopped:
                    done[row], reasons[row] = True, "stop"
            if all(done):
                break
        for s in streams:
            s.finish()
        return [
            Completion(s.text, t, r, len(p))
            for s, t, r, p in zip(streams, tokens, reasons, prompts, strict=True)
        ]

    @torch.inference_mode()
    def _decode(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> Iterator[list[int | None]]:
        """Yield one new token per row per step; None once a row hit EOS / a stop token."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TunelabError("every prompt needs at least one token.")
        device = self.model.device
        context = self.model.config.max_position_embeddings
        longest = max(map(len, prompts))
        if longest >= context:
            raise TunelabError(
                f"the prompt has {longest} tokens but the model's context is {context}; "
                "shorten the prompt."
            )
        max_new = min(params.max_tokens, context - longest)
        if max_new < params.max_tokens:
            log.warning("max_tokens lowered to %d to fit the model's context", max_new)

        B = len(prompts)
        pads = [longest - len(p) for p in prompts]
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.tensor(
            [[pad_id] * n + p for n, p in zip(pads, prompts, strict=True)], device=device
        )
        slots = torch.arange(longest + max_new, device=device)
        pad_t = torch.tensor(pads, device=device)[:, None]
        key_valid = slots[None, :] >= pad_t if any(pads) else None  # (B, S)
        positions = (slots[None, :] - pad_t).clamp(min=0)  # (B, S)
        cache = KVCache(self.model.config, B, longest + max_new, device, self.model.dtype)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        histories = [list(p) for p in prompts]
        generators = [params.make_generator(device) for _ in prompts]
        finished = [False] * B

        logits = self.model(ids, positions[:, :longest], key_valid, cache, last_only=True)
        for step in range(max_new):
            next_tokens = sample_next(logits[:, -1], [params] * B, histories, generators)
            out: list[int | None] = []
            for row, tok in enumerate(next_tokens):
                finished[row] = finished[row] or tok in stop_ids
                out.append(None if finished[row] else tok)
                histories[row].append(tok)
            yield out
            if all(finished) or step == max_new - 1:
                return
            pos = positions[:, cache.length : cache.length + 1]
            logits = self.model(
                torch.tensor(next_tokens, device=device)[:, None], pos, key_valid, cache
            )


def eos_ids_from(generation_config: dict) -> set[int]:
    eos = generation_config.get("eos_token_id")
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {int(eos)}
