"""Scheduler without a model: token budget, decode first, max_num_seqs, preemption, abort."""

from __future__ import annotations

from tunelab.engine.block_manager import BlockManager
from tunelab.engine.sampler import SamplingParams
from tunelab.engine.scheduler import Scheduler
from tunelab.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, budget)


def seq(n: int, request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(range(1, n + 1)), SamplingParams(ignore_eos=True))


def step(sched: Scheduler) -> dict[Sequence, int]:
    """One step as the engine runs it; sampled sequences get token 7."""
    batch = sched.schedule()
    sched.update(batch)
    for s in batch.seqs:
        if s.num_computed_tokens == s.num_tokens:
            s.append_token(7)
    return dict(zip(batch.seqs, batch.num_tokens, strict=True))


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    sched = make(budget=16)
    a = seq(40)
    sched.add(a)
    assert [step(sched)[a] for _ in range(3)] == [16, 16, 8]
    assert a.num_output_tokens == 1 and step(sched)[a] == 1  # then it decodes


def test_decodes_go_first_and_the_new_prompt_gets_the_rest():
    sched = make(budget=16)
    a, b = seq(5, "a"), seq(6, "b")
    sched.add(a)
    sched.add(b)
    assert step(sched) == {a: 5, b: 6}
    c = seq(100, "c")
    sched.add(c)
    planned = step(sched)
    assert list(planned.items()) == [(a, 1), (b, 1), (c, 14)]
    assert sum(step(sched).values()) == 16


def test_max_num_seqs_bounds_the_running_set():
    sched = make(max_num_seqs=2, budget=64)
    seqs = [seq(3, str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    assert set(step(sched)) == set(seqs[:2])
    assert seqs[2].status is SequenceStatus.WAITING
    sched.finish(seqs[0], "stop")
    assert seqs[2] in step(sched)


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    sched = make(num_blocks=4, budget=64)  # 16 token slots
    a, b = seq(8, "a"), seq(8, "b")
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled: 2 full blocks each, then a 9th token to compute
    late = seq(2, "late")
    sched.add(late)
    planned = step(sched)  # a needs a 3rd block: b (newest) is preempted
    assert planned == {a: 1}
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert list(sched.waiting) == [b, late]  # preempted goes before later arrivals
    assert b.block_table == [] and b.num_computed_tokens == 0
    bm = sched.block_manager
    assert bm.num_free_blocks == 4 - len(a.block_table)


def test_a_sequence_alone_preempts_itself_and_comes_back():
    sched = make(num_blocks=3, budget=64)
    a = seq(11, "a")
    sched.add(a)
    for _ in range(3):
        step(sched)
    assert a.num_tokens == 13
    # 13 tokens > 12 slots: it cannot grow, so it is preempted and waits
    assert step(sched) == {} and a.status is SequenceStatus.WAITING


def test_fifo_head_blocks_later_arrivals():
    sched = make(num_blocks=4, budget=64)
    big, small = seq(20, "big"), seq(2, "small")
    running = seq(5, "running")
    sched.add(running)
    step(sched)
    sched.add(big)  # needs 5 blocks: does not fit while "running" holds 2
    sched.add(small)
    assert set(step(sched)) == {running}


def test_abort_frees_blocks_of_running_and_waiting():
    sched = make(max_num_seqs=1)
    a, b = seq(9, "a"), seq(9, "b")
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.abort("a") == [a] and sched.abort("b") == [b]
    assert a.finish_reason == b.finish_reason == "abort"
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
