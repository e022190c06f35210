"""PagedKVCache: the block allocator and per-step metadata around paged_attention.

The cache owns key_cache / value_cache, each (num_blocks, block_size, Nkv, H) (the latent
layout: key_cache alone, (num_blocks, block_size, 1, H)), and hands out blocks to sequences.
Each step, ``begin_step`` allocates the blocks the new tokens need and returns the metadata
(cumulative_sequence_length, past_seqlens, block_table) the op takes; the op then writes the
new keys and values into the blocks. Bookkeeping lives on the host; the
metadata crosses to the device in one copy per step.
"""

import dataclasses
import heapq
from collections.abc import Mapping

import numpy

from cupy_paged import _cache_html, _cache_layout, _cache_quant
from cupy_paged.rotary import _array_module, _as_int


class CacheFullError(ValueError):
    """Too few free blocks for a step or a fork; the cache state is left unchanged."""


@dataclasses.dataclass(frozen=True)
class StepMetadata:
    """The metadata arguments of paged_attention for one step (arrays in the cache's xp).

    Attributes:
        seq_ids: tuple of the B sequence ids; query rows are grouped in this order.
        cumulative_sequence_length: int32 (B+1,); rows cum[b]:cum[b+1] are sequence b's tokens.
        past_seqlens: int32 (B,); each sequence's length before this step.
        block_table: int32 (B, max_blocks), padded with -1; max_blocks >= 1.
        num_tokens: T, the number of new tokens in all (rows of query).
    """

    seq_ids: tuple
    cumulative_sequence_length: object
    past_seqlens: object
    block_table: object
    num_tokens: int


def _aligned(n):
    """n rounded up to a multiple of 4 int32 (16 bytes), so each view starts 16-byte aligned."""
    return -(-n // 4) * 4


class PagedKVCache:
    """A paged key/value cache and its block allocator, on NumPy or CuPy arrays.

    Args:
        num_blocks: number of physical blocks, >= 1.
        block_size: tokens per block, >= 1 (GPU backends state their own rule).
        kv_num_heads: Nkv, >= 1 (1 in the latent layout).
        head_size: H, >= 1 (the op requires H % 8 == 0).
        dtype: floating dtype of the caches (float16 for GPU backends, float32 on the
            reference), or a one-byte "int8" / "float8_e4m3fn" cache with ``scale``.
        scale: for a one-byte cache only: a number (per tensor) or a (Nkv, 1, H) array (per
            channel) for both caches, or a (k_scale, v_scale) pair; float32, finite, > 0.
            A latent cache takes the key cache's scale alone (a number or (1, 1, H)).
        xp: numpy, cupy, "numpy", "cupy" or None (numpy).
        allocation: "sequential" hands out the lowest free block id first; "random" picks a
            uniformly random free block (seeded by ``seed``), which makes block tables
            non-contiguous, as they become in a long-running server.
        seed: seed for allocation="random".
        layout: "standard" (a key and a value cache) or "latent" (multi-head latent
            attention, ``kv_cache_layout="latent"`` in docs/semantics.md: one cache of one
            latent head per token, kv_num_heads = 1, V its leading v_head_size channels).
        v_head_size: Hv of the latent layout: a positive multiple of 8, at most head_size
            (None: head_size). The standard layout takes only None or head_size.

    Attributes:
        key_cache, value_cache: (num_blocks, block_size, Nkv, H) of dtype in xp,
            zero-initialised; value_cache is None in the latent layout.
        k_scale, v_scale: float32 scales in xp ((1,) or (Nkv, 1, H)) of a one-byte cache, to
            pass to ``paged_attention``; None otherwise (v_scale always, in the latent layout).

    ``attention_kwargs(step, query, key, value)`` gives a call's arguments:
    ``cpg.paged_attention(**cache.attention_kwargs(step, q, k, v), num_heads=N)``.
    """

    def __init__(self, num_blocks, block_size, kv_num_heads, head_size,
                 dtype=numpy.float16, xp=None, allocation="sequential", seed=None,
                 scale=None, layout="standard", v_head_size=None):
        self._num_blocks = _as_int(num_blocks, "num_blocks", 1)
        self._block_size = _as_int(block_size, "block_size", 1)
        self._kv_num_heads = _as_int(kv_num_heads, "kv_num_heads", 1)
        self._head_size = _as_int(head_size, "head_size", 1)
        self._layout, self._v_head_size = _cache_layout.check(
            layout, self._kv_num_heads, self._head_size, v_head_size)
        self._xp = _array_module(xp)
        self._dtype, self.k_scale, self.v_scale = _cache_quant.dtype_and_scales(
            dtype, scale, self._kv_num_heads, self._head_size, self._xp, self.latent)
        if allocation not in ("sequential", "random"):
            raise ValueError(
                f'allocation must be "sequential" or "random" (got {allocation!r})'
            )
        self._allocation = allocation
        self._rng = numpy.random.default_rng(seed)

        shape = (self._num_blocks, self._block_size, self._kv_num_heads, self._head_size)
        self.key_cache = self._xp.zeros(shape, dtype=self._dtype)
        self.value_cache = None if self.latent else self._xp.zeros(shape, dtype=self._dtype)

        # Free blocks: a min-heap for "sequential" (lowest id first, freed blocks reused first
        # when they are the lowest); for "random" any order works since picks are random.
        self._free = list(range(self._num_blocks))
        self._refcount = [0] * self._num_blocks
        self._lengths = {}   # sid -> tokens in the sequence
        self._blocks = {}    # sid -> list of physical block ids, one per block_size positions
        self._next_id = 0

    # --- read-only facts -------------------------------------------------------------------
    num_blocks = property(lambda self: self._num_blocks, doc="Number of physical blocks.")
    block_size = property(lambda self: self._block_size, doc="Tokens per block.")
    kv_num_heads = property(lambda self: self._kv_num_heads, doc="Nkv.")
    head_size = property(lambda self: self._head_size, doc="H.")
    dtype = property(lambda self: self._dtype, doc="numpy.dtype of the caches.")
    layout = property(lambda self: self._layout, doc='"standard" or "latent".')
    latent = property(lambda self: self._layout == "latent", doc='True for layout "latent".')
    v_head_size = property(lambda self: self._v_head_size,
                           doc="Hv, the channels of V (head_size in the standard layout).")
    xp = property(lambda self: self._xp, doc="The array module of the caches (numpy or cupy).")

    @property
    def num_free_blocks(self):
        """Blocks no sequence holds (int)."""
        return len(self._free)

    @property
    def sequences(self):
        """Ids of the live sequences, oldest first (tuple of int)."""
        return tuple(self._lengths)

    def length(self, sid):
        """Tokens in sequence ``sid`` (int), including those of a step begun but not yet run."""
        return self._lengths[self._check_sid(sid)]

    def blocks_of(self, sid):
        """Physical block ids of sequence ``sid`` in position order (a new list of int)."""
        return list(self._blocks[self._check_sid(sid)])

    def refcount(self, block):
        """How many live sequences hold physical block ``block`` (int; 0 = free)."""
        block = _as_int(block, "block", 0)
        if block >= self._num_blocks:
            raise ValueError(f"block must be < num_blocks={self._num_blocks} (got {block})")
        return self._refcount[block]

    # --- sequences -------------------------------------------------------------------------
    def add_sequence(self):
        """Start a new empty sequence; returns its id (int, never reused)."""
        sid = self._next_id
        self._next_id += 1
        self._lengths[sid] = 0
        self._blocks[sid] = []
        return sid

    def free(self, sid):
        """End sequence ``sid``; blocks no other sequence holds go back to the free list."""
        sid = self._check_sid(sid)
        for block in self._blocks.pop(sid):
            self._release(block)
        del self._lengths[sid]

    def fork(self, sid):
        """Start a sequence that continues ``sid``'s tokens; returns the new id (int).

        The child shares the parent's full blocks read-only (reference-counted) and gets a
        private copy of the parent's partial last block, so the op's writes, which only go to
        positions >= length, never land in a shared block. Fork after the step that wrote the
        parent's tokens has run: the copy is of the cache contents at this moment.
        Raises CacheFullError if a partial block must be copied and no block is free.
        """
        sid = self._check_sid(sid)
        length, parent_blocks = self._lengths[sid], self._blocks[sid]
        full = length // self._block_size
        partial = len(parent_blocks) > full
        if partial and not self._free:
            raise CacheFullError(
                f"fork({sid}) needs 1 free block to copy the partial last block, "
                f"but none of {self._num_blocks} is free: free a sequence first"
            )
        child_blocks = list(parent_blocks[:full])
        for block in child_blocks:
            self._refcount[block] += 1
        if partial:
            src, dst = parent_blocks[full], self._take()
            self.key_cache[dst] = self.key_cache[src]
            if self.value_cache is not None:
                self.value_cache[dst] = self.value_cache[src]
            child_blocks.append(dst)
        child = self.add_sequence()
        self._lengths[child] = length
        self._blocks[child] = child_blocks
        return child

    # --- steps -----------------------------------------------------------------------------
    def begin_step(self, new_tokens):
        """Allocate blocks for this step's new tokens and return the op's metadata.

        Args:
            new_tokens: ordered mapping {sid: n_new_tokens} or sequence of (sid, n) pairs;
                n >= 0 (0 = the sequence takes part but adds nothing). Query rows must follow
                this order.

        Returns:
            StepMetadata: cumulative_sequence_length int32 (B+1,), past_seqlens int32 (B,)
            (lengths before the step), block_table int32 (B, max_blocks) padded with -1,
            num_tokens T. Each sequence's length is advanced by its n.

        Raises CacheFullError (a ValueError) if too few blocks are free; nothing changes then.
        """
        pairs = new_tokens.items() if isinstance(new_tokens, Mapping) else new_tokens
        seq_ids, counts, seen = [], [], set()
        try:
            pairs = list(pairs)
        except TypeError:
            raise TypeError(
                "new_tokens must be a mapping {sid: n} or a list of (sid, n) pairs "
                f"(got {type(new_tokens).__name__})"
            ) from None
        for item in pairs:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise TypeError(f"new_tokens items must be (sid, n) pairs (got {item!r})")
            sid = self._check_sid(item[0])
            if sid in seen:
                raise ValueError(f"new_tokens names sequence {sid} twice")
            seen.add(sid)
            seq_ids.append(sid)
            counts.append(_as_int(item[1], f"new_tokens[{sid}]", 0))
        if not seq_ids:
            raise ValueError("new_tokens must name at least one sequence (got none)")

        bs = self._block_size
        needed = [-(-(self._lengths[s] + n) // bs) - len(self._blocks[s])
                  for s, n in zip(seq_ids, counts)]
        total = sum(needed)   # >= 0 each: a sequence always holds ceil(length / bs) blocks
        if total > len(self._free):
            detail = ", ".join(f"{s}: {k}" for s, k in zip(seq_ids, needed) if k > 0)
            raise CacheFullError(
                f"this step needs {total} new blocks ({detail}) but only {len(self._free)} of "
                f"{self._num_blocks} are free: free finished sequences, make the step "
                "smaller, or build the cache with more num_blocks"
            )

        past = [self._lengths[s] for s in seq_ids]
        for s, n, k in zip(seq_ids, counts, needed):
            self._blocks[s].extend(self._take() for _ in range(k))
            self._lengths[s] += n
        return self._metadata(seq_ids, counts, past)

    def gather(self, sid):
        """Sequence ``sid``'s logical keys and values, read through its blocks.

        Returns (K, V), each a new (length, Nkv, H) array of the cache's dtype in xp (a one-byte
        cache's dequantised to float32: x_q * scale). In the latent layout K is
        (length, 1, H) and V is (length, 1, v_head_size), a copy of K's leading v_head_size
        channels (dequantised with k_scale), as the op reads V. Positions of a step begun but
        not yet run hold whatever the blocks held before.
        """
        sid = self._check_sid(sid)
        ids = self._xp.asarray(numpy.asarray(self._blocks[sid], dtype=numpy.int64))
        length = self._lengths[sid]
        tail = (self._kv_num_heads, self._head_size)
        keys = self.key_cache[ids].reshape((-1,) + tail)[:length]
        if self.k_scale is not None:
            keys = _cache_quant.dequantize(keys, self.k_scale)
        if self.latent:
            return keys, keys[..., :self._v_head_size].copy()
        values = self.value_cache[ids].reshape((-1,) + tail)[:length]
        if self.v_scale is not None:
            values = _cache_quant.dequantize(values, self.v_scale)
        return keys, values

    def attention_kwargs(self, step, query, key, value=None):
        """The arguments of ``paged_attention`` for ``step``, as a dict of keywords.

        Add the model's own arguments to call it: ``cpg.paged_attention(**cache.
        attention_kwargs(step, q, k, v), num_heads=8, cos_cache=cos, sin_cache=sin)``.
        A latent cache gives ``value_cache=None``, ``kv_cache_layout="latent"`` and its
        ``v_head_size``; with v_head_size != head_size the op needs ``scale`` passed.

        Args:
            step: the StepMetadata ``begin_step`` returned for this call.
            query: the call's query, as ``paged_attention`` takes it.
            key: the new keys (None with a packed query).
            value: the new values; None in the latent layout (V is read from the key cache)
                and with a packed query.

        Returns:
            dict: query, key, value, key_cache, value_cache, cumulative_sequence_length,
            past_seqlens, block_table, kv_num_heads, k_scale, v_scale, kv_cache_layout and
            v_head_size (None in the standard layout).
        """
        if not isinstance(step, StepMetadata):
            raise TypeError(f"step must be the StepMetadata begin_step returned "
                            f"(got {type(step).__name__})")
        return dict(
            query=query, key=key, value=value,
            key_cache=self.key_cache, value_cache=self.value_cache,
            cumulative_sequence_length=step.cumulative_sequence_length,
            past_seqlens=step.past_seqlens, block_table=step.block_table,
            kv_num_heads=self._kv_num_heads, k_scale=self.k_scale, v_scale=self.v_scale,
            kv_cache_layout=self._layout,
            v_head_size=self._v_head_size if self.latent else None,
        )

    def __repr__(self):
        used = self._num_blocks - len(self._free)
        lengths = ", ".join(f"{s}: {n}" for s, n in self._lengths.items())
        latent = (f"layout='latent', v_head_size={self._v_head_size}, " if self.latent
                  else "")
        return (
            f"PagedKVCache(num_blocks={self._num_blocks}, block_size={self._block_size}, "
            f"kv_num_heads={self._kv_num_heads}, head_size={self._head_size}, {latent}"
            f"dtype={self._dtype}, xp={self._xp.__name__}, blocks used={used} "
            f"free={len(self._free)}, sequence lengths={{{lengths}}})"
        )

    def _repr_html_(self):
        """Jupyter's view: a grid of the physical blocks coloured by owning sequence, free
        blocks grey, with used/free/shared counts and a legend of every sequence."""
        return _cache_html.render(self)

    # --- internals -------------------------------------------------------------------------
    def _check_sid(self, sid):
        if isinstance(sid, bool) or not isinstance(sid, (int, numpy.integer)):
            raise TypeError(f"sid must be an int sequence id (got {type(sid).__name__} {sid!r})")
        sid = int(sid)
        if sid not in self._lengths:
            raise ValueError(
                f"sid {sid} is not a live sequence (live: {list(self._lengths)}); "
                "get one from add_sequence() or fork()"
            )
        return sid

    def _take(self):
        """Remove one free block from the free list and hold it once (caller checked space)."""
        if self._allocation == "sequential":
            block = heapq.heappop(self._free)
        else:
            i = int(self._rng.integers(len(self._free)))
            self._free[i], self._free[-1] = self._free[-1], self._free[i]
            block = self._free.pop()
        self._refcount[block] = 1
        return block

    def _release(self, block):
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            if self._allocation == "sequential":
                heapq.heappush(self._free, block)
            else:
                self._free.append(block)

    def _metadata(self, seq_ids, counts, past):
        """Build the step's int32 metadata on the host, then move it to xp in one copy.

        One host-to-device copy per step instead of three: each copy from pageable memory
        synchronises, and decode steps are latency-bound.
        """
        batch = len(seq_ids)
        max_blocks = max(1, max(len(self._blocks[s]) for s in seq_ids))
        sizes = (batch + 1, batch, batch * max_blocks)
        starts = numpy.cumsum((0,) + tuple(_aligned(n) for n in sizes))
        host = numpy.full(int(starts[-1]), -1, dtype=numpy.int32)
        cum = host[starts[0]:starts[0] + sizes[0]]
        cum[0] = 0
        cum[1:] = numpy.cumsum(counts)
        host[starts[1]:starts[1] + sizes[1]] = past
        table = host[starts[2]:starts[2] + sizes[2]].reshape(batch, max_blocks)
        for row, s in enumerate(seq_ids):
            table[row, :len(self._blocks[s])] = self._blocks[s]
        device = host if self._xp is numpy else self._xp.asarray(host)
        return StepMetadata(
            seq_ids=tuple(seq_ids),
            cumulative_sequence_length=device[starts[0]:starts[0] + sizes[0]],
            past_seqlens=device[starts[1]:starts[1] + sizes[1]],
            block_table=device[starts[2]:starts[2] + sizes[2]].reshape(batch, max_blocks),
            num_tokens=int(cum[-1]),
        )

