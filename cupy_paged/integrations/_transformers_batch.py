"""transformers' continuous-batching metadata translated into ``paged_attention``'s arguments.

The pure half of ``cupy_paged.integrations.transformers`` (written against transformers
5.24.0): array-module agnostic (NumPy, CuPy or torch arrays alike, in the input's module) and
importing neither transformers nor torch; a torch input makes it import torch when called.

What transformers gives an attention function, and what we make of it
----------------------------------------------------------------------
Per batch, transformers passes as keyword arguments of the attention call (the
``PagedAttentionCache`` itself goes to the layer, not the attention function):
``cu_seq_lens_q`` (int32 (B+1,), query rows are sequence-contiguous), ``cu_seq_lens_k``
(int32 (B+1,) per layer type: past + q_len of each sequence), ``max_length_q`` /
``max_length_k`` (host ints for "flash" implementations), ``read_index`` / ``write_index``
(int64 physical token rows of each allocator, sequence after sequence) and, on its decode fast
path only, ``block_table`` (int32 (groups, B, max_blocks) of page ids). From them
this module derives our arguments on the device, with no host read:

- ``cumulative_sequence_length`` = ``cu_seq_lens_q`` plus one trailing sequence that owns the
  padding rows transformers adds for static shapes (its blocks are unmapped, so it writes
  nothing and its output rows are 0);
- ``past_seqlens`` = diff(``cu_seq_lens_k``) - diff(``cu_seq_lens_q``);
- ``block_table``: the block of page j of sequence b is
  ``read_index[cu_seq_lens_k[b] + j * page_size] // block_physical_stride`` (the read index
  lists every cached row of a sequence in order; a batch with no cache reads uses
  ``write_index`` the same way), or ``kernel_table // pages_per_block`` on the fast path;
- ``max_seqlen_q`` / ``max_seqlen_k`` / ``total_kv_tokens``: upper bounds from host-side
  shapes and ``max_length_k`` (none on the fast path).

``check_layout`` refuses a cache whose page layout differs from the one mapped, and
``check_write_index`` (host arrays only; on the GPU it would need a sync) refuses index tensors
whose rows do not match the mapping, both with a ``TransformersLayoutError``.
"""
from __future__ import annotations

import dataclasses


class TransformersLayoutError(ValueError):
    """transformers' cache or batch metadata differs from what the adapter can map exactly."""


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """How transformers lays out one allocator group's cache, in token rows.

    num_layers: layers in the group (L). num_blocks: blocks of the whole storage, the two
    trash sectors included. page_size: tokens per page (our block_size). kv_heads, head_dim:
    Nkv and H. block_stride: rows of a layer's token view between block b and b + 1
    (transformers' ``block_physical_stride``, 2 * page_size * L).
    """

    num_layers: int
    num_blocks: int
    page_size: int
    kv_heads: int
    head_dim: int
    block_stride: int

    @property
    def pages_per_block(self):
        """Pages of the flat page view per block (2 * L: a key and a value page per layer)."""
        return self.block_stride // self.page_size


def check_layout(layer_types, rows_per_token, layout):
    """Raise TransformersLayoutError unless transformers' cache maps exactly onto ours.

    layer_types: the cache's allocator group names (e.g. ["full_attention"]);
    rows_per_token: the allocator's rows per token (2: a key row and a value row);
    layout: its ``CacheLayout``.
    """
    if list(layer_types) != ["full_attention"]:
        raise TransformersLayoutError(
            f"cache allocators: expected one full-attention group, got {list(layer_types)}; "
            "sliding-window and hybrid layer groups use a different page layout, which "
            "cupy_paged's adapter does not map")
    if rows_per_token != 2:
        raise TransformersLayoutError(
            f"cache rows per token: expected 2 (a key row and a value row), got {rows_per_token}")
    expected = 2 * layout.page_size * layout.num_layers
    if layout.block_stride != expected:
        raise TransformersLayoutError(
            f"block_physical_stride: expected 2 * page_size * layers = {expected} token rows "
            f"between blocks, got {layout.block_stride}; the pages are not laid out as "
            "[layer 0 keys | layer 0 values | layer 1 keys | ...] per block")
    if layout.page_size < 1 or layout.num_blocks < 1:
        raise TransformersLayoutError(
            f"cache: expected page_size >= 1 and blocks >= 1, got {layout.page_size} and "
            f"{layout.num_blocks}")


def _ops(array):
    """The few array operations the mapping needs, for the module ``array`` belongs to (NumPy,
    CuPy or torch; torch's arrays stay on ``array``'s device)."""
    module = type(array).__module__.split(".")[0]
    if module == "torch":
        import torch
        return _Ops(torch, cast=lambda a, dt: a.to(dt), clip=torch.clamp, concat=torch.cat,
                    axis="dim", device=array.device)
    if module == "cupy":
        import cupy as xp
    else:
        import numpy as xp
    return _Ops(xp, cast=lambda a, dt: a.astype(dt, copy=False), clip=xp.clip,
                concat=xp.concatenate, axis="axis")


class _Ops:
    """int32 / int64 casts, arange, where, clip, concat and full over one array module: xp
    (numpy, cupy or torch), its cast and clip and concat functions, the name of concat's axis
    argument, and for torch the device new arrays go to."""

    def __init__(self, xp, *, cast, clip, concat, axis, device=None):
        self.xp, self._cast, self.clip, self._concat, self._axis = xp, cast, clip, concat, axis
        self._on = {} if device is None else {"device": device}

    def int32(self, a):
        return self._cast(a, self.xp.int32)

    def int64(self, a):
        return self._cast(a, self.xp.int64)

    def arange(self, n):
        return self.xp.arange(n, dtype=self.xp.int64, **self._on)

    def where(self, condition, a, b):
        return self.xp.where(condition, a, b)

    def concat(self, parts, axis=0):
        return self._concat(parts, **{self._axis: axis})

    def full(self, shape, value, like):
        return self.xp.full(shape, value, dtype=like.dtype, **self._on)


def past_seqlens(cu_seq_lens_q, cu_seq_lens_k):
    """Tokens each sequence already has in the cache: diff(cu_k) - diff(cu_q), int32 (B,).

    cu_seq_lens_q, cu_seq_lens_k: integer (B+1,) cumulative new-token and key lengths.
    """
    ops = _ops(cu_seq_lens_q)
    q_len = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    k_len = cu_seq_lens_k[1:] - cu_seq_lens_k[:-1]
    return ops.int32(k_len - q_len)


def blocks_needed(max_length_k, page_size, num_rows=0):
    """Columns of the block table: enough for the longest sequence (``max_length_k`` tokens, a
    host int) and for the padding sequence (at most ``num_rows`` tokens); at least 1."""
    longest = max(int(max_length_k), int(num_rows), 1)
    return -(-longest // page_size)


def block_table_from_index(index, starts, lengths, page_size, block_stride, max_blocks):
    """Our block table from transformers' per-token physical rows, int32 (B, max_blocks).

    index: integer (R,) physical rows (``read_index`` or ``write_index`` of one allocator),
    each sequence's rows listed from its position 0, sequence after sequence, the first at
    ``starts[b]``; lengths: (B,) how many of them sequence b has; a row r lies in block
    r // block_stride. Columns a sequence does not reach are -1. Padding past the listed rows
    is never read (indices are clipped into [0, R)).
    """
    ops = _ops(index)
    count = index.shape[0]
    batch = starts.shape[0]
    if count == 0 or batch == 0:
        return ops.int32(ops.full((batch, max_blocks), -1, like=ops.int64(starts)))
    offsets = ops.arange(max_blocks) * page_size                 # first position of page j
    rows = ops.int64(starts)[:, None] + offsets[None, :]
    reached = offsets[None, :] < ops.int64(lengths)[:, None]
    rows = ops.clip(rows, 0, count - 1)
    blocks = ops.int64(index)[rows] // block_stride
    return ops.int32(ops.where(reached, blocks, -1))


def block_table_from_kernel_table(kernel_table, pages_per_block):
    """Our block table from transformers' decode fast-path table, int32 (B, max_blocks).

    kernel_table: int32 (B, max_blocks) page ids into a layer's flat page view (block id times
    ``pages_per_block``), -1 where unused.
    """
    ops = _ops(kernel_table)
    return ops.int32(ops.where(kernel_table >= 0, kernel_table // pages_per_block, -1))


def with_padding_sequence(cum, past, table, num_rows):
    """Append one sequence owning query rows cum[B] .. num_rows - 1 (transformers' padding
    rows), with past 0 and no mapped block: it writes nothing and its output rows are 0.

    cum: int32 (B+1,); past: int32 (B,); table: int32 (B, max_blocks); num_rows: T, the
    query's rows (host int). Returns (cum (B+2,), past (B+1,), table (B+1, max_blocks)).
    """
    ops = _ops(cum)
    cum = ops.concat([ops.int32(cum), ops.int32(ops.full((1,), num_rows, like=cum))])
    past = ops.concat([past, ops.int32(ops.full((1,), 0, like=past))])
    table = ops.concat([table, ops.int32(ops.full((1, table.shape[1]), -1, like=table))])
    return cum, past, table


@dataclasses.dataclass
class BatchArguments:
    """Our metadata for one transformers batch (arrays of the input's module).

    cumulative_sequence_length: int32 (B'+1,); past_seqlens: int32 (B',);
    block_table: int32 (B', max_blocks); B' = B + 1 (the padding sequence).
    max_seqlen_q, max_seqlen_k, total_kv_tokens: host-side upper bounds (or None).
    """

    cumulative_sequence_length: object
    past_seqlens: object
    block_table: object
    max_seqlen_q: int | None
    max_seqlen_k: int | None
    total_kv_tokens: int | None


def batch_arguments(layout, num_rows, cu_seq_lens_q, cu_seq_lens_k, *, read_index=None,
                    write_index=None, kernel_table=None, max_length_k=0):
    """Translate one batch's transformers metadata into ``paged_attention``'s arguments.

    layout: the ``CacheLayout``; num_rows: T, rows of the query (host int, padding included);
    cu_seq_lens_q, cu_seq_lens_k: integer (B+1,); read_index, write_index: integer (R,) rows of
    this allocator (either may be empty); kernel_table: int32 (B, max_blocks) on transformers'
    fast path, else None; max_length_k: host int >= every past + q_len.
    Returns ``BatchArguments``; never reads the arrays back to the host.
    """
    ops = _ops(cu_seq_lens_q)
    cum = ops.int32(cu_seq_lens_q)
    past = past_seqlens(cu_seq_lens_q, cu_seq_lens_k)
    if kernel_table is not None:
        table = block_table_from_kernel_table(kernel_table, layout.pages_per_block)
        if table.shape[0] != past.shape[0]:
            raise TransformersLayoutError(
                f"block_table: expected {past.shape[0]} rows (one per sequence of "
                f"cu_seq_lens_q), got {table.shape[0]}")
        bounds = (None, None, None)
        # the padding sequence needs room for its rows too
        extra = blocks_needed(0, layout.page_size, num_rows) - table.shape[1]
        if extra > 0:
            table = ops.concat([table, ops.full((table.shape[0], extra), -1, like=table)],
                               axis=1)
    else:
        max_blocks = blocks_needed(max_length_k, layout.page_size, num_rows)
        if read_index is not None and read_index.shape[0] > 0:
            # every cached row of each sequence, from position 0, sequence after sequence
            starts, lengths = cu_seq_lens_k[:-1], cu_seq_lens_k[1:] - cu_seq_lens_k[:-1]
            table = block_table_from_index(read_index, starts, lengths, layout.page_size,
                                           layout.block_stride, max_blocks)
            kv_rows = read_index.shape[0]
        elif write_index is not None:
            # no cache reads: every sequence starts at position 0, its rows are the new ones
            starts, lengths = cu_seq_lens_q[:-1], cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
            table = block_table_from_index(write_index, starts, lengths, layout.page_size,
                                           layout.block_stride, max_blocks)
            kv_rows = num_rows
        else:
            raise TransformersLayoutError(
                "batch metadata: expected read_index / write_index or a block_table, got none")
        bounds = (num_rows, max(int(max_length_k), num_rows), kv_rows + num_rows)
    cum, past, table = with_padding_sequence(cum, past, table, num_rows)
    return BatchArguments(cum, past, table, *bounds)


def expected_write_index(cum, past, table, page_size, block_stride):
    """The physical row transformers writes each new token to, if our mapping is right: int64
    (cum[-1],) ``table[b, p // page_size] * block_stride + p % page_size`` for row t of
    sequence b at position p. Host arrays (NumPy) only: it loops over sequences."""
    import numpy
    cum, past, table = (numpy.asarray(a) for a in (cum, past, table))
    rows = []
    for b in range(past.shape[0]):
        positions = past[b] + numpy.arange(cum[b + 1] - cum[b], dtype=numpy.int64)
        blocks = table[b][positions // page_size].astype(numpy.int64)
        rows.append(blocks * block_stride + positions % page_size)
    return numpy.concatenate(rows) if rows else numpy.zeros(0, numpy.int64)


def check_write_index(cum, past, table, write_index, page_size, block_stride):
    """Raise TransformersLayoutError if transformers' write_index (host, int (>= cum[-1],))
    does not put each new token where our call will (rows not sequence-contiguous, or a page
    layout other than the one mapped)."""
    import numpy
    expected = expected_write_index(cum, past, table, page_size, block_stride)
    got = numpy.asarray(write_index)[:expected.shape[0]].astype(numpy.int64)
    if got.shape[0] != expected.shape[0] or not numpy.array_equal(got, expected):
        bad = int(numpy.argmax(got != expected)) if got.shape == expected.shape else got.shape[0]
        raise TransformersLayoutError(
            f"write_index: transformers writes new token row {bad} elsewhere than the block "
            "table derived from its metadata says (its rows are not sequence-contiguous or "
            "its pages are laid out differently); refusing rather than writing the wrong slots")

