"""A small model of PyTorch's CUDA caching allocator (default settings), to tell how much of the pool a sequence
of allocations leaves unusable: the fragmentation a what-if meets, from a step's alloc/free sequence instead of
a fixed ratio.

What it follows (c10/cuda/CUDACachingAllocator.cpp, no ``PYTORCH_CUDA_ALLOC_CONF``): sizes rounded up to 512
bytes; requests of at most 1 MiB served from a small pool of 2 MiB segments, larger ones from a large pool whose
segments are 20 MiB for requests under 10 MiB and the request rounded up to 2 MiB above; best fit (the smallest
free block that is large enough, lowest address on ties); a block split when the rest is at least 512 bytes
(small pool) or more than 1 MiB (large pool), the allocation taking the front; a freed block merged with free
neighbours of its segment. A device limit (``torch.cuda.set_per_process_memory_fraction``, or the device's
size) bounds the reserved bytes; when a new segment would pass it, every cached segment with no live block is
released and the allocation retried once, and only then it runs out of memory - what decides the real boundary.

Not modelled: streams (one), expandable segments, ``max_split_size_mb`` and the other options, CUDA graphs.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # requests up to this go to the small pool
SMALL_BUFFER = 2 << 20  # the small pool's segment size
LARGE_BUFFER = 20 << 20  # the segment for a large-pool request under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


class SimOutOfMemory(Exception):
    """The simulated allocator could not serve a request even after releasing its cached segments."""


def round_size(size: int) -> int:
    """The block size the allocator serves a request of ``size`` bytes with."""
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """The size of the segment the allocator reserves for a (rounded) request it cannot serve from its cache."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(eq=False)
class Block:
    """A piece of a segment: free or handed out."""

    addr: int
    size: int
    small: bool
    prev: Block | None = None
    next: Block | None = None
    free: bool = True


@dataclass
class CachingAllocator:
    """The caching allocator's state. ``limit``: the most bytes it may reserve (None: no limit)."""

    limit: int | None = None
    allocated: int = 0
    reserved: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    retries: int = 0
    _free: dict[bool, list[tuple[int, int]]] = field(default_factory=lambda: {True: [], False: []})
    _blocks: dict[int, Block] = field(default_factory=dict)  # free blocks by address
    _next_addr: int = 0

    def malloc(self, size: int) -> Block:
        """A block of at least ``size`` bytes (SimOutOfMemory when none can be had)."""
        size = round_size(size)
        small = size <= SMALL_SIZE
        block = self._best_fit(small, size)
        if block is None:
            grown = segment_size(size)
            if not self._can_reserve(grown):
                self.release_cached()
                self.retries += 1
                if not self._can_reserve(grown):
                    raise SimOutOfMemory(size)
            block = Block(self._next_addr, grown, small)
            self._next_addr += grown + ROUND_LARGE  # segments never touch: no merge across them
            self.reserved += grown
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        rest = block.size - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
            tail = Block(block.addr + size, rest, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            self._insert(tail)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        """Give ``block`` back to the cache, merged with its free neighbours."""
        self.allocated -= block.size
        block.free = True
        for other in (block.prev, block.next):
            if other is not None and other.free:
                self._remove(other)
                if other is block.prev:
                    other.size += block.size
                    other.next = block.next
                    if block.next is not None:
                        block.next.prev = other
                    block = other
                else:
                    block.size += other.size
                    block.next = other.next
                    if other.next is not None:
                        other.next.prev = block
        self._insert(block)

    def release_cached(self) -> None:
        """Release every cached segment that holds no live block (torch.cuda.empty_cache, and the allocator's
        own step before its retry)."""
        for small in (True, False):
            for size, addr in list(self._free[small]):
                block = self._blocks[addr]
                if block.prev is None and block.next is None:
                    self._remove(block)
                    self.reserved -= block.size

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def _can_reserve(self, size: int) -> bool:
        return self.limit is None or self.reserved + size <= self.limit

    def _best_fit(self, small: bool, size: int) -> Block | None:
        pool = self._free[small]
        i = bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        block = self._blocks[pool[i][1]]
        self._remove(block)
        return block

    def _insert(self, block: Block) -> None:
        insort(self._free[block.small], (block.size, block.addr))
        self._blocks[block.addr] = block

    def _remove(self, block: Block) -> None:
        pool = self._free[block.small]
        i = bisect_left(pool, (block.size, block.addr))
        del pool[i]
        del self._blocks[block.addr]
