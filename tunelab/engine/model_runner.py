"""Run one scheduled step: flatten the tokens, run the decoder over the paged cache, sample.

Logits are computed only where they are used: the last scheduled token of every sequence that
has then computed all its tokens (it gets a new token), plus every prompt token of sequences
that asked for prompt logprobs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tunelab.engine.kv_cache import PagedKVCache
from tunelab.engine.lora import LoraRegistry
from tunelab.engine.paged_attention import PagedAttentionBackend, StepMetadata
from tunelab.engine.sampler import Logprobs, SampleInput, sample_batch, token_logprobs
from tunelab.engine.scheduler import ScheduledBatch
from tunelab.engine.sequence import Sequence
from tunelab.models.decoder import Decoder

if TYPE_CHECKING:
    from tunelab.engine.cuda_graph import DecodeGraphs


@dataclass
class StepResult:
    """New tokens (and their logprobs) per sequence; prompt logprobs computed this step."""

    samples: dict[Sequence, tuple[int, Logprobs | None]] = field(default_factory=dict)
    prompt_logprobs: dict[Sequence, list[Logprobs]] = field(default_factory=dict)


class ModelRunner:
    """Owns the model, the paged cache and the attention backend."""

    def __init__(
        self,
        model: Decoder,
        cache: PagedKVCache,
        backend: PagedAttentionBackend,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
    ):
        self.model, self.cache, self.backend = model.eval(), cache, backend
        self.eos_token_ids = set(eos_token_ids)
        self.device = model.device
        self.lora: LoraRegistry | None = None  # set by LLMEngine: per-request LoRA adapters
        self.graphs: DecodeGraphs | None = None  # set by LLMEngine: CUDA graphs for decodes

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        # Single-token entries first, shortest context first: the backend batches them in
        # groups of similar length.
        def rank(i: int) -> tuple[bool, int]:
            single = batch.num_tokens[i] == 1
            return (not single, batch.seqs[i].num_computed_tokens if single else 0)

        order = sorted(range(len(batch.seqs)), key=rank)
        seqs = [batch.seqs[i] for i in order]
        counts = [batch.num_tokens[i] for i in order]
        ids, positions, slots = [], [], []
        bs = self.cache.block_size
        for seq, n in zip(seqs, counts, strict=True):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            table = seq.block_table
            for p in range(start, start + n):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
        meta = StepMetadata(
            query_lens=counts,
            context_lens=[s.num_computed_tokens + n for s, n in zip(seqs, counts, strict=True)],
            num_decodes=sum(1 for n in counts if n == 1),
            slot_mapping=self._tensor(slots),
            block_tables=self._block_tables(seqs),
        )
        # CUDA graphs replay decode-only steps without LoRA rows (engine/cuda_graph.py).
        graph = self.graphs is not None and self.graphs.can_run(meta)
        if graph and all(seq.lora_slot < 0 for seq in seqs):
            hidden = self.graphs.run(self._tensor(ids), self._tensor(positions), meta)
        else:
            # Which rows use which LoRA adapter, for the duration of the forward pass.
            lora = self.lora.step_for(seqs, counts, self.device) if self.lora else nullcontext()
            with lora:
                hidden = self.model.model(
                    self._tensor(ids)[None],
                    self._tensor(positions)[None],
                    attn=self.backend.context(self.cache, meta),
                )[0]  # (T, hidden)
        result = StepResult()
        self._prompt_logprobs(seqs, counts, meta, hidden, result)
        self._sample(seqs, counts, meta, hidden, result)
        return result

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

    def _sample(self, seqs, counts, meta: StepMetadata, hidden, result: StepResult) -> None:
        rows, picked = [], []
        for i, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            if seq.num_computed_tokens + n == seq.num_tokens:  # all computed: sample next
                rows.append(i)
                picked.append(meta.query_starts[i] + n - 1)
        if not rows:
            return
        logits = self.model.lm_head(hidden[self._tensor(picked)])  # (S, V)
        inputs = [self._sample_input(seqs[i]) for i in rows]
        tokens, logprobs = sample_batch(logits, inputs)
        for i, token, lp in zip(rows, tokens, logprobs, strict=True):
            result.samples[seqs[i]] = (token, lp)

    def _sample_input(self, seq: Sequence) -> SampleInput:
        p = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < p.min_tokens:
            banned = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        return SampleInput(p, seq.token_ids, seq.num_prompt_tokens, seq.generator, banned)

    def _prompt_logprobs(self, seqs, counts, meta, hidden, result: StepResult) -> None:
        """Logprobs of prompt tokens 1.. given their prefix, for sequences that asked."""
        for i, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            if seq.prompt_logprobs is None:
                continue
            start = seq.num_computed_tokens
            # Position p predicts token p + 1; skip what an earlier (preempted) run recorded.
            first = max(start, len(seq.prompt_logprobs) - 1)
            last = min(start + n, seq.num_prompt_tokens - 1)
            if first >= last:
                continue
            s = meta.query_starts[i]
            rows = hidden[s + first - start : s + last - start]
            targets = self._tensor(seq.token_ids[first + 1 : last + 1])
            k = int(seq.params.prompt_logprobs or 0)
            result.prompt_logprobs[seq] = token_logprobs(self.model.lm_head(rows), targets, k)
