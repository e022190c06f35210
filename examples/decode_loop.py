"""Continuous batching on a PagedKVCache: one attention layer of a toy model, checked every step.

    python examples/decode_loop.py [--numpy] [--steps 48] [--seed 0] [--backend auto]

Requests arrive at different steps with prompts of different lengths. Each step a scheduler
builds ONE varlen batch: a decode token for every request that is generating, then prefill
chunks of at most CHUNK prompt tokens (a long prompt takes several steps) until TOKEN_BUDGET
tokens are in the batch; a single paged_attention call serves it all. A request that has
generated its tokens is freed, and its blocks go back to the free list for later arrivals.

The model is one attention layer with random weights (N=8 query heads, Nkv=2 kv heads, H=64,
rotary on every head channel) and greedy next-token choice, enough to make decode tokens
depend on what attention returned. Every step is checked twice in NumPy float64: the output
against a dense causal softmax over each sequence's keys and values read back with
cache.gather(), and the gathered keys and values against each request's own rotated K/V
history (so a block freed and reused never leaks old tokens). Runs on the GPU with CuPy
(float16, backend "auto") or on NumPy (float32, the reference) with --numpy or when no GPU
is usable.
"""

import argparse
import dataclasses
import time

import numpy

import cupy_paged
from cupy_paged.cache import PagedKVCache
from cupy_paged.rotary import rotary_cache

N, NKV, H = 8, 2, 64           # query heads, kv heads (GQA group 4), head size
D, VOCAB = 256, 512            # toy model width and vocabulary
BLOCK_SIZE, NUM_BLOCKS = 16, 28  # 448 token slots: small enough that arrivals must wait
CHUNK = 32                     # most prompt tokens one request prefills per step
TOKEN_BUDGET = 64              # most new tokens in one step's batch (decodes first)
PROMPT_LEN = (8, 120)          # prompt lengths, uniform in [lo, hi]
NEW_TOKENS = (2, 12)           # tokens each request generates, uniform in [lo, hi]


@dataclasses.dataclass
class Request:
    rid: int
    arrival: int                        # first step at which it may be admitted
    prompt: numpy.ndarray               # token ids (P,)
    max_new: int                        # tokens to generate
    sid: int = None                     # cache sequence id once admitted
    prefilled: int = 0                  # prompt tokens already in the cache
    generated: list = dataclasses.field(default_factory=list)
    held_blocks: int = 0                # blocks seen so far (to count reused ones)
    keys: list = dataclasses.field(default_factory=list)    # rotated K per step, float64
    values: list = dataclasses.field(default_factory=list)  # V per step, float64

    @property
    def lifetime_tokens(self):
        """Tokens this request ever feeds: the prompt and every generated token but the last."""
        return len(self.prompt) + self.max_new - 1


def pick_device(force_numpy):
    """(xp, dtype, why): CuPy + float16 if a GPU is usable and not refused, else NumPy + float32."""
    if force_numpy:
        return numpy, numpy.float32, "--numpy given"
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no CuPy, no driver, or a driver too old for this CuPy
        return numpy, numpy.float32, f"no usable GPU ({type(exc).__name__}: {exc})"
    if count == 0:
        return numpy, numpy.float32, "no GPU found"
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return cupy, numpy.float16, f"GPU 0: {name}"


def to_host(array):
    return array.get() if hasattr(array, "get") else numpy.asarray(array)


def synchronize(xp):
    if xp is not numpy:
        xp.cuda.get_current_stream().synchronize()


def rotate(x, positions, cos, sin):
    """Non-interleaved rotary of x (T, heads, H) at positions (T,), in float64."""
    half = cos.shape[1]
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return numpy.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half:]], axis=-1)


def dense_attention(q, keys, values, positions):
    """Causal attention of q (T, N, H) at positions (T,) over keys/values (L, Nkv, H)."""
    k = numpy.repeat(keys, N // NKV, axis=1)              # query head n uses kv head n // G
    v = numpy.repeat(values, N // NKV, axis=1)
    scores = numpy.einsum("tnh,lnh->ntl", q, k) / numpy.sqrt(H)
    visible = numpy.arange(len(keys))[None, :] <= positions[:, None]   # (T, L)
    scores = numpy.where(visible[None], scores, -numpy.inf)
    weights = numpy.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return numpy.einsum("ntl,lnh->tnh", weights, v).reshape(len(q), N * H)


def make_requests(rng, steps):
    """Requests arriving over the first two thirds of the run, in arrival order."""
    count = steps // 3 + 4
    arrivals = numpy.sort(rng.integers(0, max(1, 2 * steps // 3), size=count))
    arrivals[0] = 0                                  # something to do at step 0
    return [Request(rid=i, arrival=int(a),
                    prompt=rng.integers(0, VOCAB, size=int(rng.integers(*PROMPT_LEN,
                                                                        endpoint=True))),
                    max_new=int(rng.integers(*NEW_TOKENS, endpoint=True)))
            for i, a in enumerate(arrivals)]


def admit(cache, waiting, active, step_no):
    """Admit arrived requests first come, first served, while their whole lifetime fits.

    Blocks are reserved for every active request's remaining tokens, so begin_step can never
    run out of blocks mid-request (a real server would preempt instead).
    """
    bs = cache.block_size
    reserved = sum(-(-r.lifetime_tokens // bs) - len(cache.blocks_of(r.sid)) for r in active)
    while waiting and waiting[0].arrival <= step_no:
        need = -(-waiting[0].lifetime_tokens // bs)
        if need > cache.num_blocks:
            raise SystemExit(f"request {waiting[0].rid} needs {need} blocks, more than the "
                             f"cache's {cache.num_blocks}")
        if cache.num_free_blocks - reserved < need:
            break
        request = waiting.pop(0)
        request.sid = cache.add_sequence()
        reserved += need
        active.append(request)


def schedule(active):
    """This step's batch: [(request, token ids)], decodes first, then prefill chunks."""
    batch = [(r, numpy.array([r.generated[-1]])) for r in active
             if r.prefilled == len(r.prompt)]
    budget = TOKEN_BUDGET - len(batch)
    for r in active:
        if r.prefilled < len(r.prompt) and budget > 0:
            chunk = min(CHUNK, len(r.prompt) - r.prefilled, budget)
            batch.append((r, r.prompt[r.prefilled:r.prefilled + chunk]))
            budget -= chunk
    return batch


def check_step(cache, step, batch, q, out, cos64, sin64, k_new, v_new):
    """(max |paged - dense|, max |gathered K/V - history|) over this step's sequences.

    k_new/v_new are the step's un-rotated keys and values (T, Nkv, H) in float64; each
    request's history grows by them (keys rotated here in float64) before the comparison.
    """
    cum, past = to_host(step.cumulative_sequence_length), to_host(step.past_seqlens)
    q = to_host(q).astype(numpy.float64).reshape(-1, N, H)
    out = to_host(out).astype(numpy.float64)
    out_err = cache_err = 0.0
    for b, (request, _) in enumerate(batch):
        rows = slice(int(cum[b]), int(cum[b + 1]))
        positions = int(past[b]) + numpy.arange(rows.stop - rows.start)
        request.keys.append(rotate(k_new[rows], positions, cos64, sin64))
        request.values.append(v_new[rows])
        keys, values = (to_host(a).astype(numpy.float64) for a in cache.gather(request.sid))
        cache_err = max(cache_err,
                        float(numpy.abs(keys - numpy.concatenate(request.keys)).max()),
                        float(numpy.abs(values - numpy.concatenate(request.values)).max()))
        want = dense_attention(rotate(q[rows], positions, cos64, sin64), keys, values,
                               positions)
        out_err = max(out_err, float(numpy.abs(out[rows] - want).max()))
    return out_err, cache_err


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numpy", action="store_true", help="run on NumPy even with a GPU")
    parser.add_argument("--steps", type=int, default=48, help="scheduler steps (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and requests")
    parser.add_argument("--backend", default="auto",
                        choices=("auto", "flash", "mea", "reference"),
                        help="paged_attention backend on the GPU (default auto)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    xp, dtype, why = pick_device(args.numpy)
    backend = args.backend if xp is not numpy else "reference"
    print(f"cupy_paged {cupy_paged.__version__}: {why}")
    print(f"  running on {xp.__name__} with {numpy.dtype(dtype).name}, backend={backend!r}"
          + (" (the NumPy reference path)" if xp is numpy else ""))
    # float16: output rounding (~5e-4 relative) and fp16 P@V dominate, values are O(1) with
    # tails near 4; float32 on the reference reaches ~1e-6.
    tolerance = 1e-2 if dtype == numpy.float16 else 1e-4

    rng = numpy.random.default_rng(args.seed)
    requests = make_requests(rng, args.steps)
    max_pos = max(r.lifetime_tokens for r in requests)

    def weight(rows, cols):   # entries ~ N(0, 1/rows), so projections stay O(1)
        w = rng.standard_normal((rows, cols)) / numpy.sqrt(rows)
        return xp.asarray(w.astype(dtype))

    embed = xp.asarray(rng.standard_normal((VOCAB, D)).astype(dtype))
    w_q, w_k, w_v, w_o = weight(D, N * H), weight(D, NKV * H), weight(D, NKV * H), weight(N * H, D)
    cos, sin = rotary_cache(max_pos, H, dtype=dtype, xp=xp)
    cos64, sin64 = (to_host(a).astype(numpy.float64) for a in (cos, sin))

    def attention(cache, step, q, k, v, q_lens):
        """paged_attention of the step's q (T, N*H), k, v (T, Nkv*H); returns (T, N*H).

        q_lens: the host list of each sequence's new tokens (the step's counts).
        """
        # past + q_len of each sequence, from the host bookkeeping: no device->host copy
        ends = numpy.asarray([cache.length(s) for s in step.seq_ids])
        out = cupy_paged.paged_attention(
            q, k, v, cache.key_cache, cache.value_cache,
            step.cumulative_sequence_length, step.past_seqlens, step.block_table, cos, sin,
            num_heads=N, kv_num_heads=NKV, do_rotary=True, backend=backend,
            # host-side bounds let GPU backends size their grids without a device->host sync
            max_seqlen_q=max(q_lens), max_seqlen_k=int(ends.max()),
            total_kv_tokens=int(ends.sum()))
        return out

    # Warm-up on a scratch cache: first use compiles the kernels (then cached on disk), which
    # must not count as serving time. A prefill, a mixed and a decode-only step cover the
    # kernel variants the loop can pick: flash's tile depends on G * max q_len (decode vs
    # prefill), and a decode at the longest context with few sequences is where its split-KV
    # combine kernel is used.
    start = time.perf_counter()
    scratch = PagedKVCache(NUM_BLOCKS, BLOCK_SIZE, NKV, H, dtype=dtype, xp=xp)
    a, b = scratch.add_sequence(), scratch.add_sequence()
    for counts in ({a: max_pos - 2}, {a: 1, b: 33}, {a: 1, b: 1}):
        step = scratch.begin_step(counts)
        x = embed[xp.arange(step.num_tokens) % VOCAB]
        attention(scratch, step, x @ w_q, x @ w_k, x @ w_v, list(counts.values()))
    synchronize(xp)
    if xp is not numpy:
        print(f"  warm-up (first-use kernel compiles, cached on disk afterwards): "
              f"{time.perf_counter() - start:.2f} s")

    cache = PagedKVCache(NUM_BLOCKS, BLOCK_SIZE, NKV, H, dtype=dtype, xp=xp,
                         allocation="random", seed=args.seed)
    print(f"  {len(requests)} requests, prompts {PROMPT_LEN[0]}..{PROMPT_LEN[1]} tokens, "
          f"{NEW_TOKENS[0]}..{NEW_TOKENS[1]} new tokens each; cache {NUM_BLOCKS} blocks x "
          f"{BLOCK_SIZE} tokens; chunk {CHUNK}, {TOKEN_BUDGET} tokens per step at most\n")

    waiting, active, done = list(requests), [], []
    freed_blocks, reused = set(), 0
    op_seconds, new_tokens, generated = 0.0, 0, 0
    worst_out = worst_cache = 0.0
    steps_run = 0
    wall = time.perf_counter()
    for step_no in range(args.steps):
        admit(cache, waiting, active, step_no)
        batch = schedule(active)
        if not batch:
            if not waiting:
                break
            print(f"step {step_no:3d}: idle, next arrival at step {waiting[0].arrival}")
            continue
        q_lens = [len(tokens) for _, tokens in batch]
        step = cache.begin_step([(r.sid, n) for (r, _), n in zip(batch, q_lens)])
        for r, _ in batch:      # count blocks handed out again after a finished request's free
            blocks = cache.blocks_of(r.sid)
            reused += sum(blk in freed_blocks for blk in blocks[r.held_blocks:])
            r.held_blocks = len(blocks)

        tokens = numpy.concatenate([t for _, t in batch])
        x = embed[xp.asarray(tokens)]                            # (T, D)
        q, k, v = x @ w_q, x @ w_k, x @ w_v                      # (T, N*H), (T, Nkv*H) x2
        synchronize(xp)
        start = time.perf_counter()
        out = attention(cache, step, q, k, v, q_lens)
        synchronize(xp)
        op_seconds += time.perf_counter() - start

        # Greedy next token from each sequence's last row: decodes, and a prefill chunk that
        # finishes its prompt; a chunk in the middle of a prompt produces no token.
        last_rows = numpy.cumsum(q_lens) - 1
        hidden = x[xp.asarray(last_rows)] + out[xp.asarray(last_rows)] @ w_o
        next_tokens = to_host(xp.argmax(hidden @ embed.T, axis=1))

        k64, v64 = (to_host(a).astype(numpy.float64).reshape(-1, NKV, H) for a in (k, v))
        out_err, cache_err = check_step(cache, step, batch, q, out, cos64, sin64, k64, v64)
        worst_out, worst_cache = max(worst_out, out_err), max(worst_cache, cache_err)

        decodes = chunks = 0
        for (r, tokens_in), token in zip(batch, next_tokens):
            if r.prefilled < len(r.prompt):
                r.prefilled += len(tokens_in)
                chunks += 1
                if r.prefilled < len(r.prompt):
                    continue
            else:
                decodes += 1
            r.generated.append(int(token))
            generated += 1
        finished = [r for r in active if len(r.generated) == r.max_new]
        for r in finished:
            freed_blocks.update(cache.blocks_of(r.sid))
            cache.free(r.sid)
            active.remove(r)
            done.append(r)
        new_tokens += step.num_tokens
        steps_run += 1
        queued = sum(r.arrival <= step_no for r in waiting)
        print(f"step {step_no:3d}: T={step.num_tokens:3d} B={len(batch)} ({decodes} decode, "
              f"{chunks} prefill chunk{'s' * (chunks != 1)})  free blocks "
              f"{cache.num_free_blocks:2d}  queued {queued}"
              f"  max|paged-dense| {out_err:.1e}  max|cache-history| {cache_err:.1e}"
              + (f"  finished {[r.rid for r in finished]}" if finished else ""))
        if not (out_err <= tolerance and cache_err <= tolerance):
            raise SystemExit(f"step {step_no}: paged_attention disagrees with the dense "
                             f"recomputation (output {out_err:.3e}, cache {cache_err:.3e}, "
                             f"tolerance {tolerance:g})")
    wall = time.perf_counter() - wall

    print(f"\n{len(done)} requests finished, {len(active)} running, {len(waiting)} waiting; "
          f"{len(freed_blocks)} distinct blocks freed, {reused} block allocations reused them")
    print(f"check: all {steps_run} step{'s' * (steps_run != 1)} match the dense float64 "
          f"recomputation (max |paged - dense| = {worst_out:.2e}, max |cache - history| = "
          f"{worst_cache:.2e}, tolerance {tolerance:g})")
    print(f"throughput: {new_tokens} tokens ({generated} generated) in {op_seconds:.3f} s of "
          f"paged_attention = {new_tokens / max(op_seconds, 1e-9):,.0f} tokens/s "
          f"({xp.__name__}, backend={backend!r}); whole loop with checks {wall:.2f} s")


if __name__ == "__main__":
    main()
