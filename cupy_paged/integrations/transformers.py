"""Hugging Face transformers continuous batching served by ``cupy_paged.paged_attention``.

Written against transformers 5.24.0 (``transformers/generation/continuous_batching/``: its
``PagedAttentionCache`` with one ``FullAttentionCacheAllocator``, ``ContinuousBatchingIOs``
metadata, and the ``cache.update`` call every attention layer makes before its attention
function). Usage::

    from cupy_paged.integrations import transformers as cpg_hf
    name = cpg_hf.prepare(model)              # registers "cupy_paged_flash", switches to it
    outputs = model.generate_batch(prompts, generation_config)

This module is the transformers / torch side: ``register``, ``prepare``,
``attention_forward`` and the cache re-layout. The translation of transformers' batch
metadata into our arguments (``batch_arguments`` and its helpers, re-exported here) lives in
``cupy_paged.integrations._transformers_batch``, whose docstring says how each argument is
derived.

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

transformers hands the ``PagedAttentionCache`` to each attention layer (its ``cache``
argument), not to the attention function, so ``prepare`` adds a forward pre-hook to each
attention layer that passes the cache on and attaches the adapter to a fresh cache before the
layer's ``cache.update`` runs: no update writes or gathers in transformers' layout. Without
the hooks (``register`` alone) the attention call finds no cache and raises.

Refused, with a ``TransformersLayoutError`` naming what differs: sliding-window or hybrid
layer groups (several allocators), a cache dtype other than the activations', head counts or
head size other than the cache's, attention sinks, dropout, a batch dimension other than 1,
and index tensors whose rows do not match the mapping (checked on host arrays; on the GPU
that check would need a sync, so it is skipped).

Streams, syncs, CUDA graphs: torch tensors go to ``paged_attention`` as they are; it views them
without a copy through DLPack (``cupy.from_dlpack``) and runs on
``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``. The metadata is
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

from ._transformers_batch import (
    BatchArguments,
    CacheLayout,
    TransformersLayoutError,
    batch_arguments,
    block_table_from_index,
    block_table_from_kernel_table,
    blocks_needed,
    check_layout,
    check_write_index,
    expected_write_index,
    past_seqlens,
    with_padding_sequence,
)

__all__ = [
    "NAME", "TRANSFORMERS_VERSION", "register", "prepare", "attention_forward",
    "TransformersLayoutError", "CacheLayout", "BatchArguments", "batch_arguments",
    "past_seqlens", "blocks_needed", "block_table_from_index", "block_table_from_kernel_table",
    "with_padding_sequence", "check_layout", "check_write_index", "expected_write_index",
]

NAME = "cupy_paged_flash"
TRANSFORMERS_VERSION = "5.24.0"   # the version this adapter was written and tested against
_STATE_ATTRIBUTE = "_cupy_paged_state"


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
