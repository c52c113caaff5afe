"""Paged KV-cache blocks: allocation, reference counts and prefix caching.

A block holds the keys/values of ``block_size`` consecutive tokens of one sequence. Once a
block is full and computed it is registered under a chained hash (its tokens, the request's
LoRA adapter and the hash of the block before it), so a later sequence with the same prefix
and adapter reuses it instead of computing it again. Freed blocks that are registered stay
in the cache, evictable in LRU order, until their slot is needed for something else.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from tunelab.engine.sequence import Sequence

# (hash of the previous block, LoRA adapter id or None, this block's token ids): the same
# tokens under another adapter have other keys/values, so they never share a block.
BlockKey = tuple[int | None, int | None, tuple[int, ...]]


class Block:
    __slots__ = ("block_id", "hash", "key", "ref_count")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while registered in the prefix cache
        self.key: BlockKey | None = None  # what the hash was made of (guards collisions)


def kv_tokens_needed(prompt_len: int, max_tokens: int, context: int) -> int:
    """Cache slots one sequence can fill: every token but the last sampled one (whose keys
    and values are never computed), within the model's context."""
    return min(prompt_len + max_tokens, context) - 1


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Hands out blocks of the paged cache to sequences.

    Free blocks come in two kinds: never-registered ones (taken first) and registered ones
    with no user (a prefix-cache entry; the least recently freed is evicted first).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.hits = 0  # prefix-cache statistics, in tokens
        self.queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    # ---- hashing ---------------------------------------------------------------------------

    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of the first ``num_blocks`` full blocks of ``seq`` (memoised)."""
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash(self._key(seq, i, hashes[-1] if hashes else None)))
        return hashes[:num_blocks]

    def _key(self, seq: Sequence, i: int, prev: int | None) -> BlockKey:
        bs = self.block_size
        return (prev, seq.lora_id, tuple(seq.token_ids[i * bs : (i + 1) * bs]))

    # ---- prefix cache ----------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of ``seq`` that leaves a token to compute.

        The last token is always recomputed (its logits give the next sample), so a prompt
        made only of cached blocks reuses all but its last block.
        """
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits of every prompt token
        max_blocks = (seq.num_tokens - 1) // self.block_size
        found = []
        for i, h in enumerate(self.block_hashes(seq, max_blocks)):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            prev = seq.block_hashes[i - 1] if i else None
            if self.blocks[block_id].key != self._key(seq, i, prev):
                break  # a hash collision: not our tokens
            found.append(block_id)
        return found

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the full blocks of ``seq`` whose keys/values are now computed."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        hashes = self.block_hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block = self.blocks[seq.block_table[i]]
            # Another sequence may have registered the same tokens first: keep that one.
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                block.key = self._key(seq, i, hashes[i - 1] if i else None)
                self.cached[block.hash] = block.block_id
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    # ---- allocation ------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int]) -> bool:
        """Whether ``allocate`` would succeed (prefix: ``cached_prefix`` for a new sequence)."""
        reused_free = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        have = len(seq.block_table) + len(prefix)
        computed = len(prefix) * self.block_size if prefix else seq.num_computed_tokens
        need = blocks_for(computed + num_new_tokens, self.block_size) - have
        return need <= self.num_free_blocks - reused_free

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Give ``seq`` the blocks for ``num_new_tokens`` more tokens; False if out of blocks.

        ``prefix`` (only for a sequence without blocks) is reused first and counted as
        computed. Nothing changes when it returns False.
        """
        prefix = list(prefix)
        if not self.can_allocate(seq, num_new_tokens, prefix):
            return False
        if not seq.block_table:  # admission: take the cached prefix
            for block_id in prefix:
                self._use(block_id)
            seq.block_table = prefix
            seq.num_computed_tokens = len(prefix) * self.block_size
            seq.num_cached_blocks = len(prefix)
            if seq.num_preemptions == 0:  # a re-admission recomputes its own tokens: no hit
                seq.num_cached_tokens = seq.num_computed_tokens
                self.queries += seq.num_prompt_tokens
                self.hits += seq.num_cached_tokens
        else:
            assert not prefix, "a prefix is only reused by a sequence without blocks"
        need = blocks_for(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_table) < need:
            seq.block_table.append(self._take_free())
        return True

    def free(self, seq: Sequence) -> None:
        """Release the blocks of ``seq`` (finished, aborted or preempted)."""
        # Tail blocks first: they become the first evicted, keeping shared prefixes longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_ids.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    def _use(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)  # least recently freed
            block = self.blocks[block_id]
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = block.key = None
        self.blocks[block_id].ref_count = 1
        return block_id
