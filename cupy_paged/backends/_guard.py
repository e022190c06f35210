"""The metadata guard on the GPU (``cuda_src/guard/guard.cu``): one launch before the prologue
that flags every sequence whose metadata values would send a kernel outside its arrays, NaNs
its output rows and records the first faulting call in a per-device error word, without a
host sync. ``check_errors`` reads the word back (one sync) and raises ``MetadataError``.

Layouts (mirrors of ``cuda_src/guard/fault_codes.cuh``; tests/test_guard.py checks they agree):
  fault: int32 (B+1,); fault[b] = FAULT_* bits of sequence b, fault[B] = the batch's bits.
    Kernels skip sequence b when fault[b] != 0 and everything when fault[B] != 0.
  scratch: uint64[SCRATCH_SIZE] per (device, stream): one call's running state, reset by the
    call's last block.
  error word: uint64[WORD_SIZE] per device; see ``error_from_word``.
The fault array and the scratch live in a per-(device, stream) buffer that only grows (outgrown
fault arrays stay referenced), so a captured CUDA graph keeps valid pointers and calls on
different streams never share one. CuPy is imported on first launch only.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import MetadataError
from ..jit import KernelSpec, get_function, register
from ._launch import DirectLaunch, check_aligned
from ._params import entry_point, params_struct
from .plan import Launch

# Fault bits, bit k = rank k in _validate.check_metadata's order.
FAULT_CUM_START = 1 << 0       # cumulative_sequence_length[0] != 0 (batch)
FAULT_CUM_END = 1 << 1         # cumulative_sequence_length[B] != T (batch)
FAULT_CUM_ORDER = 1 << 2       # cumulative_sequence_length[b] > [b + 1] (batch)
FAULT_PAST = 1 << 3            # past_seqlens[b] < 0
FAULT_BLOCK_ID = 1 << 4        # a block id outside [-1, num_blocks) in a column b uses
FAULT_CAPACITY = 1 << 5        # q_len > 0 and past + q_len > max_blocks * block_size
FAULT_MAX_SEQLEN_Q = 1 << 6    # q_len > max_seqlen_q
FAULT_MAX_SEQLEN_K = 1 << 7    # past + q_len > max_seqlen_k
FAULT_TOTAL_KV = 1 << 8        # sum of past + q_len > total_kv_tokens (batch)
FAULT_ROTARY = 1 << 9          # do_rotary, q_len > 0 and past + q_len > cos_cache rows
FAULT_KINDS = 10
BATCH_FAULTS = FAULT_CUM_START | FAULT_CUM_END | FAULT_CUM_ORDER | FAULT_TOTAL_KV
FAULT_NAMES = ("cum_start", "cum_end", "cum_order", "past", "block_id", "capacity",
               "max_seqlen_q", "max_seqlen_k", "total_kv_tokens", "rotary")

SCRATCH_DONE, SCRATCH_BITS, SCRATCH_FAULTED, SCRATCH_TOTAL, SCRATCH_SLOTS = range(5)
SCRATCH_SIZE = SCRATCH_SLOTS + 2 * FAULT_KINDS
WORD_SEEN, WORD_SEQUENCES, WORD_CALLS, WORD_CLAIMED, WORD_SLOTS = range(5)
WORD_SIZE = WORD_SLOTS + 2 * FAULT_KINDS
EMPTY_SLOT = (1 << 64) - 1

NAME = "guard_metadata"
WARPS = 4                      # sequences per block in flight, one warp each (kWarps)
THREADS = 32 * WARPS
MAX_GRID = 32768               # blocks; warps walk further sequences grid-stride
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1

PARAMS = params_struct("guard/params.cuh", "cupy_paged::guard::GuardParams")
SPEC = register(KernelSpec(
    NAME, "guard/guard.cu",
    f"static_assert(cupy_paged::guard::kThreads == {THREADS}, \"_guard.THREADS\");\n"
    + entry_point(NAME, PARAMS, "cupy_paged::guard::run(p);", THREADS)))


class _StreamBuffers:
    """One (device, stream)'s fault array (grow-only), its (B+1,) views, and its scratch."""

    __slots__ = ("fault", "scratch", "views")

    def __init__(self, fault, scratch):
        self.fault, self.views, self.scratch = fault, {}, scratch


_streams: dict = {}    # (device id, stream ptr) -> _StreamBuffers
_words: dict = {}      # device id -> uint64 error word
_retired: list = []    # outgrown fault arrays: a captured graph may still point into them


class GuardStep:
    """The metadata guard as a plan step (the first launch of every GPU plan): sets
    ``call.fault`` to the int32 (B+1,) verdict and NaNs the faulted rows of ``call.out``."""

    def __init__(self, problem, device):
        kernel, self.word = _device(device)
        grid, packed = _packed(problem)
        self.batch, self.device = problem.batch, device
        self.launch = DirectLaunch(kernel, PARAMS, packed, grid, (THREADS,))
        self.facts = Launch(NAME, grid, (THREADS, 1, 1))

    def __call__(self, call):
        p = call.ptr
        call.fault = self._launch(p["cumulative_sequence_length"], p["past_seqlens"],
                                  p["block_table"], p["out"], call.stream)

    def run(self, a, out, stream=None):
        """Check the metadata on the device; returns the int32 (B+1,) fault array.

        a: the CuPy arrays by argument name (cumulative_sequence_length, past_seqlens,
        block_table are read); out: the (T, N*H) 16-bit output, whose faulted rows become NaN.
        Launches one kernel on the current stream; never synchronises. The array stays valid
        until the next guard on this stream. stream: the stream handle (None: the current
        CuPy stream).
        """
        if stream is None:
            import cupy

            stream = cupy.cuda.get_current_stream().ptr
        o_p = out.data.ptr
        if o_p & 15:  # NaN rows are written as 16-byte chunks
            check_aligned(out=out)
        return self._launch(a["cumulative_sequence_length"].data.ptr, a["past_seqlens"].data.ptr,
                            a["block_table"].data.ptr, o_p, stream)

    def _launch(self, cum, past, block_table, out, stream):
        """The launch on ``stream`` (a handle) from the arguments' device addresses."""
        key = (self.device, stream)
        batch = self.batch
        buffers = _streams.get(key)
        if buffers is None or buffers.fault.size <= batch:
            buffers = _grow(key, buffers, batch + 1)
        fault = buffers.views.get(batch)
        if fault is None:
            fault = buffers.views[batch] = buffers.fault[:batch + 1]
        self.launch(cum, past, block_table, fault.data.ptr, out, buffers.scratch.data.ptr,
                    self.word.data.ptr, stream=stream)
        return fault


def run_guard(problem, a, out):
    """The guard alone on the current device (``GuardStep.run``), outside a plan."""
    import cupy

    return _standalone_step(problem, cupy.cuda.runtime.getDevice()).run(a, out)


@functools.lru_cache(maxsize=16)
def _standalone_step(problem, device):
    """The GuardStep ``run_guard`` runs, kept for calls that repeat (tests, timing)."""
    return GuardStep(problem, device)


def check_errors(device=None):
    """Raise ``MetadataError`` if the metadata guard stopped any sequence since the last check.

    device: a GPU id (or cupy Device); None checks every GPU the guard has run on. Waits for
    the GPU (one device synchronisation), reads the error word and clears it, then raises for
    the first faulting call it records: the sequence, the fault and its values. Returns None
    when the word is clean.
    """
    if not _words:
        return
    import cupy

    ids = sorted(_words) if device is None else [int(getattr(device, "id", device))]
    for d in ids:
        word = _words.get(d)
        if word is None:
            continue
        dev = cupy.cuda.Device(d)
        with dev:
            dev.synchronize()
            host = word.get()
            if not host[WORD_SEEN]:
                continue
            word.set(clean_word())
            dev.synchronize()
        raise error_from_word(host, d)


def clean_word():
    """The error word (and scratch slot) initial value: zeros, slots all ones."""
    word = np.zeros(WORD_SIZE, dtype=np.uint64)
    word[WORD_SLOTS:] = EMPTY_SLOT
    return word


def error_from_word(word, device=None):
    """The ``MetadataError`` an error word (WORD_SIZE integers) describes, or None when clean.

    word[WORD_SEEN]: OR of every fault bit since the last check; [WORD_SEQUENCES],
    [WORD_CALLS]: stopped sequences and faulting calls; slot pair k (kind k) of the first
    faulting call: seq << 32 | uint32(v1) and seq << 32 | uint32(v2), all ones when absent.
    The error names that call's lowest-ranked fault kind at its lowest sequence.
    """
    word = [int(x) for x in word]
    seen = word[WORD_SEEN]
    if not seen:
        return None
    names = tuple(FAULT_NAMES[k] for k in range(FAULT_KINDS) if seen >> k & 1)
    sequences, calls = word[WORD_SEQUENCES], word[WORD_CALLS]
    where = "" if device is None else f"GPU {device}: "
    summary = (f"{where}the metadata guard stopped {sequences} "
               f"sequence{'s' if sequences != 1 else ''} in {calls} "
               f"call{'s' if calls != 1 else ''} since the last check (their output rows are NaN "
               f"and they wrote nothing to the caches)")
    for kind in range(FAULT_KINDS):
        first, second = word[WORD_SLOTS + 2 * kind], word[WORD_SLOTS + 2 * kind + 1]
        if first != EMPTY_SLOT:
            break
    else:
        return MetadataError(f"{summary}; faults seen: {', '.join(names)}", device=device,
                             sequences=sequences, calls=calls, seen=names)
    bit = 1 << kind
    sequence = first >> 32
    values = (_int32(first), _int32(second))
    first_fault = describe_fault(bit, sequence, *values)
    others = [n for n in names if n != FAULT_NAMES[kind]]
    message = (f"{summary}; the first: {first_fault}"
               + (f"; also seen: {', '.join(others)}" if others else "")
               + ". Pass validate=True to check on the host before launching.")
    return MetadataError(message, device=device, fault=FAULT_NAMES[kind], sequence=sequence,
                         values=values, whole_batch=bool(bit & BATCH_FAULTS),
                         sequences=sequences, calls=calls, seen=names)


def describe_fault(bit, seq, v1, v2):
    """One fault in words: what the guard recorded for sequence (or cum index) ``seq``."""
    n1, n2 = _number(v1), _number(v2)
    cum = "cumulative_sequence_length"
    return {
        FAULT_CUM_START: f"{cum}[0] = {n1}: must be 0 (the whole batch was stopped)",
        FAULT_CUM_END: f"{cum}[{seq}] = {n1}: must equal the number of query rows T = {n2} "
                       "(the whole batch was stopped)",
        FAULT_CUM_ORDER: f"{cum} must be non-decreasing, got {cum}[{seq}] = {n1} > "
                         f"{cum}[{seq + 1}] = {n2} (the whole batch was stopped)",
        FAULT_PAST: f"sequence {seq}: past_seqlens[{seq}] = {n1}: must be >= 0",
        FAULT_BLOCK_ID: f"sequence {seq}: block_table[{seq}, {n1}] = {n2}: block ids must lie "
                        "in [-1, num_blocks)",
        FAULT_CAPACITY: f"sequence {seq}: needs positions up to past_seqlens[{seq}] + q_len = "
                        f"{n1} + {n2}, more than the block table's capacity "
                        "max_blocks * block_size",
        FAULT_MAX_SEQLEN_Q: f"sequence {seq}: q_len {n1} is more than the bound "
                            f"max_seqlen_q = {n2} given",
        FAULT_MAX_SEQLEN_K: f"sequence {seq}: past_seqlens[{seq}] + q_len = {n1} is more than "
                            f"the bound max_seqlen_k = {n2} given",
        FAULT_TOTAL_KV: f"total_kv_tokens: the metadata needs {n1}, more than the bound {n2} "
                        "given (the whole batch was stopped)",
        FAULT_ROTARY: f"sequence {seq}: reaches position {n1} but cos_cache has only {n2} rows",
    }[bit]


def fault_names(bits):
    """The names of the FAULT_* bits set in ``bits``, in rank order."""
    return tuple(FAULT_NAMES[k] for k in range(FAULT_KINDS) if int(bits) >> k & 1)


def error_word(device):
    """A host copy of ``device``'s error word without clearing it (None if the guard never ran
    there); waits for the device."""
    word = _words.get(device)
    if word is None:
        return None
    import cupy

    with cupy.cuda.Device(device) as dev:
        dev.synchronize()
        return word.get()


# ---------------------------------------------------------------- helpers


def _int32(slot):
    low = slot & 0xFFFFFFFF
    return low - (1 << 32) if low >> 31 else low


def _number(v):
    """Values are saturated to int32 on the device: the extremes mean "at least"."""
    if v == _INT32_MAX:
        return f"{v} or more"
    if v == -_INT32_MAX - 1:
        return f"{v} or less"
    return str(v)


def _grow(key, buffers, size):
    """A fault array of at least ``size`` entries (doubling), keeping the stream's scratch."""
    import cupy

    if buffers is None:
        scratch = cupy.asarray(np.concatenate(
            [np.zeros(SCRATCH_SLOTS, np.uint64), clean_word()[WORD_SLOTS:]]))
        old = 0
    else:
        scratch, old = buffers.scratch, buffers.fault.size
        _retired.append(buffers.fault)
    buffers = _StreamBuffers(cupy.zeros(max(size, 2 * old, 64), dtype=cupy.int32), scratch)
    _streams[key] = buffers
    return buffers


@functools.cache
def _device(device_id):
    """(RawKernel, error word) of GPU ``device_id``; the word starts clean."""
    import cupy

    kernel = get_function(NAME, device=device_id)
    with cupy.cuda.Device(device_id):
        word = cupy.asarray(clean_word())
    _words[device_id] = word
    return kernel, word


def _packed(problem):
    """(grid, packed GuardParams scalars) of a Problem."""
    def bound(x):
        return -1 if x is None else min(int(x), _INT64_MAX)

    blocks = max(1, min(-(-problem.batch // WARPS), MAX_GRID))
    return (blocks,), PARAMS.pack(
        num_tokens=problem.num_tokens, batch=problem.batch,
        row_chunks=problem.num_heads * problem.head_size // 8, block_size=problem.block_size,
        num_blocks=min(problem.num_blocks, _INT32_MAX), max_blocks=problem.max_blocks,
        cos_rows=problem.cos_rows if problem.do_rotary else -1,
        max_seqlen_q=bound(problem.max_seqlen_q), max_seqlen_k=bound(problem.max_seqlen_k),
        total_kv_tokens=bound(problem.total_kv_tokens))
