"""Hugging Face transformers continuous batching served by ``cupy_paged.paged_attention``.

Written against transformers 5.24.0 (``transformers/generation/continuous_batching/``: its
``PagedAttentionCache`` with one ``FullAttentionCacheAllocator``, ``ContinuousBatchingIOs``
metadata, and the ``cache.update`` call every attention layer makes before its attention
function). Usage::

    from cupy_paged.integrations import transformers as cpg_hf
    name = cpg_hf.register()                  # "cupy_paged_flash"
    model.set_attn_implementation(name)       # or from_pretrained(..., attn_implementation=name)
    outputs = model.generate_batch(prompts, generation_config)

What transformers gives an attention function, and what we make of it
----------------------------------------------------------------------
Per batch, transformers passes (as keyword arguments of the attention call): ``cache`` (the
``PagedAttentionCache``), ``cu_seq_lens_q`` (int32 (B+1,), query rows are sequence-contiguous),
``cu_seq_lens_k`` (int32 (B+1,) per layer type: past + q_len of each sequence),
``max_length_q`` / ``max_length_k`` (host ints for "flash" implementations), ``read_index`` /
``write_index`` (int64 physical token rows of each allocator, sequence after sequence) and, on
its decode fast path only, ``block_table`` (int32 (groups, B, max_blocks) of page ids). From
them this module derives our arguments on the device, with no host read:

- ``cumulative_sequence_length`` = ``cu_seq_lens_q`` plus one trailing sequence that owns the
  padding rows transformers adds for static shapes (its blocks are unmapped, so it writes
  nothing and its output rows are 0);
- ``past_seqlens`` = diff(``cu_seq_lens_k``) - diff(``cu_seq_lens_q``);
- ``block_table``: the block of page j of sequence b is
  ``read_index[cu_seq_lens_k[b] + j * page_size] // block_physical_stride`` (the read index
  lists every cached row of a sequence in order; a batch with no cache reads uses
  ``write_index`` the same way), or ``kernel_table // pages_per_block`` on the fast path.

Why the adapter re-lays out transformers' cache storage
-------------------------------------------------------
transformers keeps one flat byte tensor in which block b holds, for every layer of the group,
a page of keys then a page of values: the keys of one layer, seen as
(pages, page_size, kv_heads, head_dim), are a view that also spans every value page.
``paged_attention`` takes a key cache and a value cache that share no byte (docs/semantics.md,
"Buffers"), so those views cannot be passed as they are. Instead, the first time it sees a
cache, the adapter views the same storage as (layers, 2, num_blocks, page_size, kv_heads,
head_dim): layer i's key cache is ``[i, 0]`` and its value cache ``[i, 1]``, each C-contiguous,
disjoint, and indexed by transformers' own block ids (no extra memory, no copy). From then on
the storage is in that layout, so the adapter also replaces, on that cache object only:

- ``cache.update``: no index_copy_ of the new keys/values and no index_select gather of the
  whole past (our kernel writes the new keys and values into the paged cache itself and reads
  the past through the block table); it only selects the layer's ``cu_seq_lens_k`` /
  ``max_length_k`` as transformers' own update does;
- ``cache.perform_cache_copy`` (forking, for parallel sampling): copies blocks in our layout;
- the allocator's ``_copy_view`` (byte-level block offloading to the host): replaced by an
  object that raises, since a byte copy of a block would no longer move that block's data.

The very first layer call on a fresh cache still goes through transformers' own update (the
adapter only sees the cache inside that call): it writes that layer's new keys into the
storage before anything of ours lives there, so it is harmless.

Refused, with a ``TransformersLayoutError`` naming what differs: sliding-window or hybrid
layer groups (several allocators), a cache dtype other than the activations', head counts or
head size other than the cache's, attention sinks, dropout, a batch dimension other than 1,
and index tensors whose rows do not match the mapping above (checked on host arrays; on the
GPU that check would need a sync, so it is skipped).

Streams, syncs, CUDA graphs: torch tensors go to ``paged_attention`` as they are; it views them
without a copy through DLPack (``cupy.from_dlpack``) and runs on
``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``. The metadata above is
computed with torch ops on torch's current stream, so allocations come from torch's caching
allocator (graph-safe), and nothing on the per-step path reads the device: the bounds
``max_seqlen_q`` / ``max_seqlen_k`` / ``total_kv_tokens`` come from host-side shapes and
``max_length_k``. The one exception: if transformers hands ``max_length_k`` over as a tensor
(it does not for "flash"-named implementations), ``int()`` of it syncs once per call.

Naming: transformers 5.24's continuous batching accepts only "paged|eager", "sdpa" and names
containing "flash" (which also make it skip building a dense attention mask), so the default
name is "cupy_paged_flash". Its decode fast path (a kernel block table) is enabled only for
FlashAttention 2/3 packages, so with this adapter every batch takes the varlen path, which the
adapter serves without the gather. The adapter handles a ``block_table`` argument too.
"""
from __future__ import annotations

import dataclasses
import functools

NAME = "cupy_paged_flash"
TRANSFORMERS_VERSION = "5.24.0"   # the version this adapter was written and tested against
_STATE_ATTRIBUTE = "_cupy_paged_state"


class TransformersLayoutError(ValueError):
    """transformers' cache or batch metadata differs from what the adapter can map exactly."""


# ------------------------------------------------------------------------------------------
# Pure mapping: NumPy, CuPy or torch arrays alike (no transformers, no torch import).
# ------------------------------------------------------------------------------------------

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
    """The few array operations the mapping needs, for the module ``array`` belongs to."""
    module = type(array).__module__.split(".")[0]
    if module == "torch":
        return _TorchOps(array)
    if module == "cupy":
        import cupy
        return _NumpyOps(cupy)
    import numpy
    return _NumpyOps(numpy)


class _NumpyOps:
    def __init__(self, xp):
        self.xp = xp

    def arange(self, n):
        return self.xp.arange(n, dtype=self.xp.int64)

    def int32(self, a):
        return a.astype(self.xp.int32, copy=False)

    def int64(self, a):
        return a.astype(self.xp.int64, copy=False)

    def where(self, condition, a, b):
        return self.xp.where(condition, a, b)

    def clip(self, a, low, high):
        return self.xp.clip(a, low, high)

    def concat(self, parts, axis=0):
        return self.xp.concatenate(parts, axis=axis)

    def full(self, shape, value, like):
        return self.xp.full(shape, value, dtype=like.dtype)


class _TorchOps:
    def __init__(self, array):
        import torch
        self.torch, self.device = torch, array.device

    def arange(self, n):
        return self.torch.arange(n, dtype=self.torch.int64, device=self.device)

    def int32(self, a):
        return a.to(self.torch.int32)

    def int64(self, a):
        return a.to(self.torch.int64)

    def where(self, condition, a, b):
        return self.torch.where(condition, a, b)

    def clip(self, a, low, high):
        return self.torch.clamp(a, low, high)

    def concat(self, parts, axis=0):
        return self.torch.cat(parts, dim=axis)

    def full(self, shape, value, like):
        return self.torch.full(shape, value, dtype=like.dtype, device=self.device)


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


# ------------------------------------------------------------------------------------------
# The torch / transformers side (imports them only when called).
# ------------------------------------------------------------------------------------------

def register(name=NAME):
    """Register the adapter with transformers' ``AttentionInterface`` under ``name`` and return
    the name. transformers 5.24's continuous batching accepts only names containing "flash"
    (besides "paged|eager" and "sdpa"), hence the default."""
    import torch
    from transformers import AttentionInterface
    if "flash" not in name:
        raise ValueError(
            f"name: expected a name containing 'flash' (transformers {TRANSFORMERS_VERSION}'s "
            f"continuous batching refuses other custom names), got {name!r}")
    AttentionInterface.register(name, torch.compiler.disable(attention_forward))
    _declare_flash_like(name)
    return name


def prepare(model, name=NAME):
    """Serve ``model``'s continuous batching with cupy_paged; returns the implementation name.

    Registers the adapter (``register``), switches the model to it
    (``model.set_attn_implementation``) and adds a forward pre-hook to each attention layer
    (each module with a ``layer_idx`` whose forward takes ``cache``): transformers hands the
    paged cache to the layer, not to the attention function, and the hook passes it on, and
    attaches the adapter to a new cache before the layer's ``cache.update`` runs (so that
    update never writes or gathers in transformers' layout). Idempotent.
    """
    import inspect
    register(name)
    model.set_attn_implementation(name)
    for module in model.modules():
        if getattr(module, "_cupy_paged_hooked", False) or not hasattr(module, "layer_idx"):
            continue
        try:
            parameters = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            continue
        if "cache" in parameters or "past_key_values" in parameters:
            module.register_forward_pre_hook(functools.partial(_hand_over_cache, name),
                                             with_kwargs=True)
            module._cupy_paged_hooked = True
    return name


def _hand_over_cache(name, module, args, kwargs):
    """Forward pre-hook of an attention layer: while the model runs under ``name``, remember
    the layer's paged cache for the attention call, attaching the adapter to it first (see
    ``prepare``). Under any other implementation it does nothing."""
    from transformers.generation.continuous_batching import PagedAttentionCache
    config = getattr(module, "config", None)
    if getattr(config, "_attn_implementation", name) != name:
        module._cupy_paged_cache = None
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, PagedAttentionCache):
        dtype = cache.cache_allocators[next(iter(cache.cache_allocators))].cache_dtype \
            if cache.cache_allocators else None
        _attached_state(cache, dtype)
    module._cupy_paged_cache = cache
    return None


def _declare_flash_like(name):
    """Tell transformers that ``name`` is a loaded "flash" implementation.

    A name containing "flash" makes ``set_attn_implementation`` import the flash functions of
    that name (from a Hub kernel repo, which fails offline and for us). transformers memoizes
    the last loaded implementation in ``modeling_flash_attention_utils``; seeding that memo
    with our name makes the import a no-op. Its plain / varlen functions are stand-ins that
    raise: the adapter serves attention itself and transformers only calls them from its own
    flash attention function, which our name replaces. No kvcache function: transformers then
    keeps its decode fast path off and every batch takes the varlen path, served above.
    """
    from transformers import modeling_flash_attention_utils as fa

    def unsupported(*args, **kwargs):
        raise TransformersLayoutError(
            f"{name}: serves transformers' continuous batching (paged cache) only; use another "
            "attn_implementation for generate() without generate_batch")

    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = unsupported, unsupported, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._process_with_kvcache_kwargs_fn = dict
    fa._loaded_implementation = name


def attention_forward(module, query, key, value, attention_mask=None, dropout=0.0,
                      scaling=None, softcap=None, sliding_window=None, **kwargs):
    """transformers attention function for its paged (continuous batching) path.

    query: (1, N, T, H); key, value: (1, Nkv, T, H), the new tokens (rotary already applied),
    float16 / bfloat16 on the GPU, float16 / float32 on the CPU (NumPy reference).
    kwargs: transformers' paged metadata (``cache``, ``cu_seq_lens_q``, ``cu_seq_lens_k``,
    ``read_index``, ``write_index``, ``block_table``, ``max_length_k``...).
    Writes the new keys / values into the paged cache and returns ((1, T, N, H), None).
    """
    import torch
    cache = kwargs.get("cache", getattr(module, "_cupy_paged_cache", None))
    _check_call(module, query, key, cache, dropout, sliding_window, kwargs)
    state = _attached_state(cache, query.dtype)
    layer_idx = module.layer_idx
    key_cache, value_cache = state.caches[layer_idx]
    _, heads, rows, head_dim = query.shape
    kv_heads = key.shape[1]
    _check_heads(state.layout, kv_heads, head_dim, key_cache.dtype, query.dtype)

    group = state.group_index
    kernel_table = kwargs.get("block_table")
    if kernel_table is not None and kernel_table.dim() == 3:
        kernel_table = kernel_table[group]
    cu_k = kwargs["cu_seq_lens_k"]
    if isinstance(cu_k, dict):        # transformers' own update() was bypassed before us
        cu_k = cu_k["full_attention"]
    max_length_k = kwargs.get("max_length_k", 0)
    if isinstance(max_length_k, dict):
        max_length_k = max_length_k["full_attention"]
    if isinstance(max_length_k, torch.Tensor):
        max_length_k = int(max_length_k)          # a host read: see the module docstring
    read_index, write_index = _group_entry(kwargs.get("read_index"), group), \
        _group_entry(kwargs.get("write_index"), group)
    args = batch_arguments(state.layout, rows, kwargs["cu_seq_lens_q"], cu_k,
                           read_index=read_index, write_index=write_index,
                           kernel_table=kernel_table, max_length_k=max_length_k)
    if query.device.type == "cpu" and kernel_table is None and write_index is not None:
        check_write_index(args.cumulative_sequence_length[:-1], args.past_seqlens[:-1],
                          args.block_table[:-1], write_index, state.layout.page_size,
                          state.layout.block_stride)

    # (1, heads, T, H) -> packed rows (T, heads * H); a copy, as rotary left them head-major
    q_rows = query[0].transpose(0, 1).reshape(rows, heads * head_dim).contiguous()
    k_rows = key[0].transpose(0, 1).reshape(rows, kv_heads * head_dim).contiguous()
    v_rows = value[0].transpose(0, 1).reshape(rows, kv_heads * head_dim).contiguous()
    out = torch.empty_like(q_rows)
    if rows:
        from cupy_paged import paged_attention
        paged_attention(
            q_rows, k_rows, v_rows, key_cache, value_cache, args.cumulative_sequence_length,
            args.past_seqlens, args.block_table, num_heads=heads, kv_num_heads=kv_heads,
            scale=float(scaling) if scaling is not None else 0.0,
            softcap=float(softcap) if softcap else 0.0, out=out,
            max_seqlen_q=args.max_seqlen_q, max_seqlen_k=args.max_seqlen_k,
            total_kv_tokens=args.total_kv_tokens)
    return out.view(1, rows, heads, head_dim), None


def _group_entry(per_group, group):
    """The allocator group's entry of transformers' per-group list of index tensors."""
    if per_group is None:
        return None
    if isinstance(per_group, (list, tuple)):
        return per_group[group] if len(per_group) > group else None
    return per_group


def _check_call(module, query, key, cache, dropout, sliding_window, kwargs):
    """Refuse calls the adapter cannot serve exactly, naming what differs."""
    from transformers.generation.continuous_batching import PagedAttentionCache
    if not isinstance(cache, PagedAttentionCache):
        raise TransformersLayoutError(
            f"cache: expected transformers' PagedAttentionCache (continuous batching: "
            f"generate_batch, after cupy_paged.integrations.transformers.prepare(model)), got "
            f"{type(cache).__name__}; cupy_paged serves only the paged path")
    if query.dim() != 4 or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise TransformersLayoutError(
            f"query/key: expected (1, heads, T, head_dim) packed batches with as many new keys "
            f"as queries, got query {tuple(query.shape)} and key {tuple(key.shape)} (did "
            "transformers' own cache update run and gather the past?)")
    if dropout:
        raise TransformersLayoutError(f"dropout: expected 0 at inference, got {dropout}")
    if sliding_window is not None:
        raise TransformersLayoutError(
            f"sliding_window: expected None (full attention), got {sliding_window}")
    if kwargs.get("s_aux") is not None or hasattr(module, "sinks"):
        raise TransformersLayoutError("attention sinks: not supported by cupy_paged")
    if "cu_seq_lens_q" not in kwargs or "cu_seq_lens_k" not in kwargs:
        raise TransformersLayoutError(
            "batch metadata: expected cu_seq_lens_q and cu_seq_lens_k from continuous batching")


def _check_heads(layout, kv_heads, head_dim, cache_dtype, dtype):
    if (kv_heads, head_dim) != (layout.kv_heads, layout.head_dim):
        raise TransformersLayoutError(
            f"key heads: expected {layout.kv_heads} kv heads of size {layout.head_dim} (the "
            f"cache's), got {kv_heads} of size {head_dim}")
    if cache_dtype != dtype:
        raise TransformersLayoutError(
            f"cache dtype: expected the activations' {dtype}, got {cache_dtype}")


@dataclasses.dataclass
class _CacheState:
    """What the adapter keeps on a PagedAttentionCache: the layout, each layer's (key_cache,
    value_cache) view in our layout, and the allocator group's index."""

    layout: CacheLayout
    caches: dict
    group_index: int
    storage: object


def _attached_state(cache, dtype):
    """The adapter's state on ``cache``, attaching it (re-layout + patches) the first time."""
    state = getattr(cache, _STATE_ATTRIBUTE, None)
    if state is None:
        state = _attach(cache, dtype)
        setattr(cache, _STATE_ATTRIBUTE, state)
    return state


def _attach(cache, dtype):
    """Check the cache's layout, view its storage in ours, and replace the methods that would
    read or write it in transformers' layout (see the module docstring)."""
    allocators = list(cache.cache_allocators.values())
    allocator = allocators[0] if allocators else None
    layers = list(getattr(allocator, "layer_indices", []))
    storage_bytes = cache.cache_tensor.numel()
    bytes_per_block = getattr(allocator, "bytes_per_block", 0) or 1
    layout = CacheLayout(
        num_layers=len(layers), num_blocks=storage_bytes // bytes_per_block,
        page_size=getattr(allocator, "tokens_per_page", 0),
        kv_heads=getattr(allocator, "num_key_value_heads", 0),
        head_dim=getattr(allocator, "head_dim", 0),
        block_stride=getattr(allocator, "block_physical_stride", 0))
    check_layout(list(cache.cache_allocators.keys()), getattr(allocator, "rows_per_token", 0),
                 layout)
    if allocator.cache_dtype != dtype:
        raise TransformersLayoutError(
            f"cache dtype: expected the activations' {dtype}, got {allocator.cache_dtype}")
    if storage_bytes % bytes_per_block:
        raise TransformersLayoutError(
            f"cache storage: expected whole blocks of {bytes_per_block} bytes, got "
            f"{storage_bytes} bytes")
    storage = cache.cache_tensor.view(dtype).view(
        layout.num_layers, 2, layout.num_blocks, layout.page_size, layout.kv_heads,
        layout.head_dim)
    caches = {layer: (storage[i, 0], storage[i, 1]) for i, layer in enumerate(layers)}
    cache.update = _pass_through_update(cache)
    cache.perform_cache_copy = _block_copy(storage, list(cache.cache_allocators.keys()))
    allocator._copy_view = _Relaid()
    return _CacheState(layout, caches, allocator.index, storage)


def _pass_through_update(cache):
    """``cache.update`` without the cache write and the gather: selects the layer's
    ``cu_seq_lens_k`` / ``max_length_k`` and returns the new key / value states unchanged."""
    import torch

    @torch.compiler.disable
    def update(key_states, value_states, layer_idx, kwargs):
        layer_type = cache.layer_to_allocator[layer_idx].layer_type
        for name in ("cu_seq_lens_k", "max_length_k"):
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = kwargs[name][layer_type]
        return key_states, value_states

    return update


def _block_copy(storage, group_names):
    """``cache.perform_cache_copy`` in our layout: block dst of every layer's keys and values
    becomes a copy of block src."""
    import torch

    def perform_cache_copy(copy_src_and_dst):
        for name, (src, dst) in copy_src_and_dst.items():
            if name not in group_names:
                raise TransformersLayoutError(f"cache copy: unknown allocator group {name!r}")
            if src:
                device = storage.device
                src_ids = torch.tensor(src, dtype=torch.long, device=device)
                dst_ids = torch.tensor(dst, dtype=torch.long, device=device)
                storage[:, :, dst_ids] = storage[:, :, src_ids]

    return perform_cache_copy


class _Relaid:
    """Stands in for an allocator's byte-level block view once the storage is in our layout:
    any use (block offloading to the host) raises instead of moving the wrong bytes."""

    def __getattr__(self, name):
        raise TransformersLayoutError(
            "cache offloading: transformers copies blocks as bytes in its own layout, but "
            "cupy_paged has re-laid this cache out (layer, key/value, block, ...); disable "
            "offloading or give the cache enough memory")
