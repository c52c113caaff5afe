"""Continuous batching: which sequences run how many tokens in the next step.

One token budget (``max_num_batched_tokens``) per step is shared by every running sequence:
decodes (one token each) are served first, then prefill chunks of running sequences, then new
sequences from the waiting queue in arrival order. Every prompt is prefilled in chunks that fit
what is left of the budget, so a long prompt never stalls the decodes. When the cache runs out
of blocks, the newest running sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be recomputed later (mostly from the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tunelab.engine.block_manager import BlockManager
from tunelab.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``num_tokens[i]`` tokens of ``seqs[i]``, from its first uncomputed."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    """Owns the waiting queue and the running set; the block manager owns their blocks."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        assert max_num_seqs >= 1 and max_num_batched_tokens >= 1
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        planned: dict[Sequence, int] = {}
        preempted: list[Sequence] = []
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        chunks = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + chunks:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, n):
                victim = self.running[-1]
                budget += planned.pop(victim, 0)  # it may have been planned already
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                planned[seq] = n
                budget -= n
        # New work waits while blocks are short (something was just preempted).
        if not (preempted and planned):
            budget = self._admit(planned, budget)
        batch = ScheduledBatch(preempted=preempted)
        for seq, n in planned.items():
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
        return batch

    def _admit(self, planned: dict[Sequence, int], budget: int) -> int:
        """Move waiting sequences (FIFO) into the running set while budget and blocks last."""
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = bm.cached_prefix(seq)
            remaining = seq.num_tokens - len(prefix) * bm.block_size
            # Admit only when the whole rest of the prompt fits, not just this step's chunk:
            # a half-prefilled sequence would soon preempt the others.
            if not bm.can_allocate(seq, remaining, prefix):
                break  # FIFO: nobody overtakes the head of the queue
            n = min(remaining, budget)
            allocated = bm.allocate(seq, n, prefix)
            assert allocated
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            planned[seq] = n
            budget -= n
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        # Victims are taken newest first, so each goes in front of the younger ones.
        self.waiting.appendleft(seq)

    def update(self, batch: ScheduledBatch) -> None:
        """After the step ran: count the computed tokens and cache their full blocks."""
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.cache_computed_blocks(seq)

    # ---- ending sequences ------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length, abort, error) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of ``request_id`` with reason "abort"; return them."""
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs
