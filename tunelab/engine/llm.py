"""Offline batch generation: ``LLM(model).generate(prompts, params)``.

>>> llm = LLM("default")
>>> out = llm.generate(["Once upon a time", [{"role": "user", "content": "Hi!"}]],
...                    SamplingParams(temperature=0, max_tokens=32))
>>> out[1].outputs[0].text

With LoRA adapters (PEFT format), selected per prompt and batched together over one base:

>>> llm = LLM("default", adapters={"sql": "runs/sql/adapter", "chat": "runs/chat/adapter"})
>>> llm.generate(["SELECT", "Hi", "Hello"], params, lora=["sql", "chat", None])
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tunelab.engine.llm_engine import EngineConfig, LLMEngine
from tunelab.engine.lora import DEFAULT_MAX_LORA_RANK, LoadedAdapter
from tunelab.engine.outputs import RequestOutput
from tunelab.engine.prompts import Messages, Prompt, encode_chat, encode_prompt, is_single_prompt
from tunelab.engine.sampler import SamplingParams
from tunelab.errors import TunelabError
from tunelab.models.decoder import Decoder


class LLM:
    """A model served by the paged engine for offline use.

    ``model`` is a model spec (``default``, a directory, a hub id, a .gguf; see
    ``tunelab.hub``) or an already loaded ``Decoder`` (then pass its ``tokenizer``, or None to
    work on token ids only). ``max_num_seqs`` / ``max_num_batched_tokens`` bound one step;
    ``max_cache_tokens`` caps the KV cache (on CPU it is the cache size, default 16384).
    ``adapters`` maps names to PEFT LoRA adapter directories to load (requests pick one with
    ``lora=name``); ``max_lora_rank`` is the largest adapter rank accepted.
    ``attention_backend`` is "auto", "sdpa" or "triton"; ``cuda_graphs`` replays decode steps
    as CUDA graphs (None: on with CUDA and the triton backend). ``cpu_packed_linears``
    pre-packs the weights of a bf16 model on a CPU with bf16 matmul hardware (faster decode,
    one more copy of the weights in RAM). See docs/engine.md.
    """

    def __init__(
        self,
        model: str | Path | Decoder = "default",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        max_cache_tokens: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        memory_fraction: float = 0.9,
        attention_backend: str = "auto",
        cuda_graphs: bool | None = None,
        tokenizer: Any | None = None,
        eos_token_ids: set[int] | None = None,
        adapters: dict[str, str | Path] | None = None,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        cpu_packed_linears: bool = True,
    ):
        config = EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_cache_tokens=max_cache_tokens,
            block_size=block_size,
            enable_prefix_caching=enable_prefix_caching,
            memory_fraction=memory_fraction,
            attention_backend=attention_backend,
            cuda_graphs=cuda_graphs,
            max_lora_rank=max_lora_rank,
            cpu_packed_linears=cpu_packed_linears,
        )
        if isinstance(model, Decoder):
            if device is not None or dtype is not None:
                raise TunelabError(
                    "device and dtype apply when loading a model spec; move or cast the "
                    "Decoder yourself before passing it."
                )
            self.engine = LLMEngine(model, tokenizer, config, eos_token_ids)
        else:
            self.engine = LLMEngine.from_pretrained(model, device, dtype, config)
        for name, path in (adapters or {}).items():
            self.engine.load_adapter(name, path)

    @property
    def tokenizer(self) -> Any | None:
        return self.engine.tokenizer

    def encode_chat(self, messages: Messages) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template."""
        return encode_chat(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def load_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        """Load a PEFT LoRA adapter as ``name`` (see ``LLMEngine.load_adapter``)."""
        return self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, lora: str | None = None
    ) -> Iterator[str]:
        """Yield the text of one completion as it is decoded (``SimpleGenerator.stream``).

        Drop-in for ``SimpleGenerator`` in ``generate`` / ``chat``; a chat re-sending its
        history gets the earlier turns from the prefix cache. ``lora``: an adapter name.
        """
        engine = self.engine
        request_id = engine.add_request(prompt, params, stream=True, lora=lora)
        try:
            while request_id in engine.requests:
                for delta in engine.step():
                    if delta.request_id != request_id:
                        continue
                    if delta.error:
                        raise TunelabError(delta.error)
                    if delta.text:
                        yield delta.text
                    if delta.finished:
                        engine.pop_output(request_id)
        finally:
            if request_id in engine.requests:  # the caller stopped early
                engine.abort(request_id)
                engine.pop_output(request_id)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; results come back in the order of ``prompts``.

        A prompt is text (sent as is), chat messages (rendered with the model's chat template)
        or token ids. ``params`` is one ``SamplingParams`` for all, or one per prompt; so is
        ``lora``, a loaded adapter's name (None: the base model). A prompt that cannot run (an
        unknown adapter too) gets finish_reason "error" and its ``error``; the others go on.
        """
        batch = [prompts] if is_single_prompt(prompts) else list(prompts)
        per_prompt = _per_prompt(params or SamplingParams(), len(batch), "SamplingParams")
        adapters = _per_prompt(lora, len(batch), "adapter names")
        engine = self.engine
        ids = [
            engine.add_request(p, sp, lora=a)
            for p, sp, a in zip(batch, per_prompt, adapters, strict=True)
        ]
        bar = _progress(len(ids)) if use_tqdm else None
        try:
            while engine.has_unfinished():
                for delta in engine.step():
                    if bar is not None and delta.finished:
                        bar.update(1)
        except BaseException:
            for request_id in ids:  # leave the engine clean for the next call
                engine.abort(request_id)
                engine.pop_output(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [engine.pop_output(request_id) for request_id in ids]


def _per_prompt(value, count: int, what: str) -> list:
    """``value`` repeated for every prompt, or checked to be one per prompt if a list."""
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise TunelabError(
            f"got {len(value)} {what} for {count} prompts: give one, or one per prompt."
        )
    return value


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="prompt", dynamic_ncols=True)
