"""Block manager: reference counts, chained prefix hashes, LRU eviction of cached blocks."""

from __future__ import annotations

from tunelab.engine.block_manager import BlockManager
from tunelab.engine.sampler import SamplingParams
from tunelab.engine.sequence import Sequence

BS = 4


def seq(tokens, **params) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(**params))


def admit(bm: BlockManager, s: Sequence) -> None:
    """Allocate the whole sequence (reusing its cached prefix) and mark it computed."""
    prefix = bm.cached_prefix(s)
    assert bm.allocate(s, s.num_tokens - len(prefix) * BS, prefix)
    s.num_computed_tokens = s.num_tokens
    bm.cache_computed_blocks(s)


def test_allocate_and_free_count_blocks():
    bm = BlockManager(8, BS)
    a = seq(range(10))  # 3 blocks
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.allocate(a, 0) and len(a.block_table) == 3  # nothing new needed
    a.num_computed_tokens = 10
    assert bm.allocate(a, 2) and len(a.block_table) == 3  # 12 tokens still fit in 3 blocks
    assert bm.allocate(a, 3) and len(a.block_table) == 4
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_table == []


def test_allocation_failure_changes_nothing():
    bm = BlockManager(2, BS)
    a = seq(range(12))
    assert not bm.can_allocate(a, 12, [])
    assert not bm.allocate(a, 12)
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_shared_prefix_is_reused_with_ref_counts():
    bm = BlockManager(16, BS)
    a = seq(range(10))
    admit(bm, a)  # blocks [0..3], [4..7] full and cached; [8, 9] partial
    b = seq([*range(8), 50, 51, 52])
    admit(bm, b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == 8
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 16
    assert len(bm.evictable) == 2  # the two full blocks stay cached; partial ones do not


def test_hashes_chain_over_the_prefix():
    bm = BlockManager(16, BS)
    admit(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: no hit for either.
    other = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.cached_prefix(other) == []
    assert bm.block_hashes(other, 2)[1] != bm.block_hashes(seq([1, 2, 3, 4, 5, 6, 7, 8]), 2)[1]


def test_last_token_is_never_served_from_the_cache():
    bm = BlockManager(16, BS)
    admit(bm, seq(range(8)))
    again = seq(range(8))  # two full blocks, both cached: the last one is recomputed
    assert len(bm.cached_prefix(again)) == 1
    assert len(bm.cached_prefix(seq(range(9)))) == 2


def test_prompt_logprobs_and_disabled_caching_skip_the_cache():
    bm = BlockManager(16, BS)
    admit(bm, seq(range(9)))
    assert bm.cached_prefix(seq(range(9), prompt_logprobs=0)) == []
    off = BlockManager(16, BS, enable_prefix_caching=False)
    admit(off, seq(range(9)))
    assert off.cached == {} and off.cached_prefix(seq(range(9))) == []


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(4, BS)
    a, b = seq(range(4 + 1)), seq(range(100, 104 + 1))
    admit(bm, a)
    admit(bm, b)
    bm.free(a)  # a's full block freed first -> evicted first
    bm.free(b)
    a_block, b_block = a.block_hashes[0], b.block_hashes[0]
    assert set(bm.cached) == {a_block, b_block}
    c = seq(range(200, 209))  # 3 blocks: 2 plain free ones, then evicts a's cached block
    assert bm.allocate(c, 9)
    assert set(bm.cached) == {b_block}
    assert bm.cached_prefix(seq(range(100, 106))) != []  # b's block still hits
    assert bm.cached_prefix(seq(range(6))) == []


def test_reusing_an_evictable_block_takes_it_out_of_the_free_pool():
    bm = BlockManager(3, BS)
    a = seq(range(5))
    admit(bm, a)
    bm.free(a)
    b = seq([*range(4), 7, 7, 7, 7, 7, 7, 7])  # 11 tokens: the cached block + 2 new ones
    prefix = bm.cached_prefix(b)
    assert len(prefix) == 1
    assert bm.can_allocate(b, 7, prefix)
    assert not bm.can_allocate(seq(range(50, 63)), 13, [])  # 4 blocks never fit
    assert bm.allocate(b, 7, prefix)
    assert bm.num_free_blocks == 0 and not bm.evictable
    assert bm.blocks[prefix[0]].ref_count == 1 and b.num_computed_tokens == 4


def test_readmission_after_preemption_is_not_counted_as_a_prompt_hit():
    bm = BlockManager(16, BS)
    s = seq(range(3))
    admit(bm, s)
    for t in range(3, 10):  # generated tokens fill two blocks, which get cached
        s.append_token(t, None)
    assert bm.allocate(s, s.num_tokens - s.num_computed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_computed_blocks(s)
    queries, hits = bm.queries, bm.hits
    bm.free(s)  # preempted: back to waiting, recomputed from its (cached) blocks later
    s.num_preemptions += 1
    s.block_table, s.num_computed_tokens = [], 0
    admit(bm, s)
    assert s.num_computed_tokens == s.num_tokens  # the cache served the recompute...
    assert s.num_cached_tokens == 0  # ...but no prompt token came from the cache
    assert (bm.queries, bm.hits) == (queries, hits)
