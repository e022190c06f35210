"""The metadata guard on the CPU: NVRTC builds of cuda_src/guard/guard.cu for every arch, the
Python mirror of its fault bits and buffer layouts against the .cuh, and the messages
``check_errors`` raises from an error word (tests/test_guard_gpu.py runs it on a GPU).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cupy_paged
from cupy_paged.backends import _guard
from cupy_paged.errors import MetadataError
from cupy_paged.jit import compile_variant

try:
    from .test_prologue import buildable, compile_every_arch
except ImportError:
    from test_prologue import buildable, compile_every_arch

REPO = Path(__file__).resolve().parents[1]
CODES = REPO / "cuda_src" / "guard" / "fault_codes.cuh"


pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest: a private kernel cache


# ---------------------------------------------------------------- NVRTC builds


def test_guard_compiles_for_every_arch(cache_dir):
    build = compile_every_arch([_guard.SPEC], cache_dir)
    assert build, "NVRTC builds none of sm_70..sm_90"


@pytest.mark.parametrize("arch", ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90"])
def test_guard_compile_per_arch(arch):
    _, refused = buildable([_guard.SPEC])
    if (_guard.SPEC, arch) in refused:
        pytest.skip(f"this NVRTC cannot build {arch}")
    result = compile_variant(_guard.NAME, arch)
    assert result.path.read_bytes()[:4] == b"\x7fELF"
    assert _guard.NAME.encode() in result.path.read_bytes()


def test_guard_compile_is_registered_and_dtype_free():
    assert _guard.SPEC.name == _guard.NAME == "guard_metadata"
    assert _guard.SPEC.min_arch == 0 and not _guard.SPEC.cutlass
    assert "__launch_bounds__(128)" in _guard.SPEC.entry_code


# ---------------------------------------------------------------- Python mirror == .cuh


def _cuh_constants():
    text = CODES.read_text()
    values = {name: 1 << int(shift) for name, shift in
              re.findall(r"(FAULT_[A-Z_]+) = 1 << (\d+),", text)}
    values.update({name: int(v) for name, v in re.findall(r"([A-Z]+_[A-Z_]+) = (\d+),", text)})
    values["kFaultKinds"] = int(re.search(r"kFaultKinds = (\d+);", text).group(1))
    batch = re.search(r"kBatchFaults = ([A-Z_ |]+);", text).group(1)
    values["kBatchFaults"] = sum(values[n.strip()] for n in batch.split("|"))
    return values


def test_fault_bits_and_layouts_match_the_cuh():
    cuh = _cuh_constants()
    bits = {n: v for n, v in cuh.items() if n.startswith("FAULT_")}
    assert bits == {n: getattr(_guard, n) for n in bits}
    assert len(bits) == _guard.FAULT_KINDS == cuh["kFaultKinds"] == len(_guard.FAULT_NAMES)
    assert sorted(bits.values()) == [1 << k for k in range(_guard.FAULT_KINDS)]
    assert cuh["kBatchFaults"] == _guard.BATCH_FAULTS
    for name in ("SCRATCH_DONE", "SCRATCH_BITS", "SCRATCH_FAULTED", "SCRATCH_TOTAL",
                 "SCRATCH_SLOTS", "WORD_SEEN", "WORD_SEQUENCES", "WORD_CALLS", "WORD_CLAIMED",
                 "WORD_SLOTS"):
        assert cuh[name] == getattr(_guard, name), name
    assert _guard.WORD_SIZE == _guard.SCRATCH_SIZE == 4 + 2 * _guard.FAULT_KINDS


def test_fault_names_follow_the_host_check_order():
    """Bit k is rank k: the order in which _validate.check_metadata raises."""
    assert _guard.FAULT_NAMES == (
        "cum_start", "cum_end", "cum_order", "past", "block_id", "capacity", "max_seqlen_q",
        "max_seqlen_k", "total_kv_tokens", "rotary")
    assert _guard.fault_names(_guard.FAULT_ROTARY | _guard.FAULT_PAST) == ("past", "rotary")
    assert _guard.fault_names(0) == ()


# ---------------------------------------------------------------- error words -> messages


def word(*faults, sequences=1, calls=1, seen=0):
    """An error word holding ``faults`` = (bit, seq, v1, v2) slot pairs."""
    w = _guard.clean_word()
    bits = seen
    for bit, seq, v1, v2 in faults:
        k = bit.bit_length() - 1
        w[_guard.WORD_SLOTS + 2 * k] = (seq << 32) | (v1 & 0xFFFFFFFF)
        w[_guard.WORD_SLOTS + 2 * k + 1] = (seq << 32) | (v2 & 0xFFFFFFFF)
        bits |= bit
    w[_guard.WORD_SEEN] = bits
    w[_guard.WORD_SEQUENCES] = sequences
    w[_guard.WORD_CALLS] = calls
    w[_guard.WORD_CLAIMED] = 1 if faults else 0
    return w


def test_clean_word_is_no_error():
    assert _guard.error_from_word(_guard.clean_word()) is None
    assert _guard.error_from_word(np.zeros(_guard.WORD_SIZE, np.uint64)) is None


def test_error_names_sequence_fault_and_value():
    err = _guard.error_from_word(word((_guard.FAULT_PAST, 5, -3, 2)), device=1)
    assert isinstance(err, MetadataError) and isinstance(err, ValueError)
    assert (err.fault, err.sequence, err.values, err.device) == ("past", 5, (-3, 2), 1)
    assert not err.whole_batch and err.sequences == 1 and err.calls == 1
    msg = str(err)
    assert msg.startswith("GPU 1: the metadata guard stopped 1 sequence in 1 call ")
    assert "sequence 5: past_seqlens[5] = -3: must be >= 0" in msg
    assert "validate=True" in msg


def test_error_reports_the_lowest_ranked_kind_and_lists_the_others():
    w = word((_guard.FAULT_ROTARY, 0, 99, 64), (_guard.FAULT_BLOCK_ID, 7, 3, 1000),
             (_guard.FAULT_CAPACITY, 2, 40, 9), sequences=3, calls=2)
    err = _guard.error_from_word(w, device=0)
    assert (err.fault, err.sequence, err.values) == ("block_id", 7, (3, 1000))
    assert err.seen == ("block_id", "capacity", "rotary")
    msg = str(err)
    assert "stopped 3 sequences in 2 calls" in msg
    assert "block_table[7, 3] = 1000: block ids must lie in [-1, num_blocks)" in msg
    assert "also seen: capacity, rotary" in msg


@pytest.mark.parametrize("bit, seq, v1, v2, text", [
    (_guard.FAULT_CUM_START, 0, 4, 0, "cumulative_sequence_length[0] = 4: must be 0"),
    (_guard.FAULT_CUM_END, 3, 9, 10,
     "cumulative_sequence_length[3] = 9: must equal the number of query rows T = 10"),
    (_guard.FAULT_CUM_ORDER, 1, 6, 2, ("cumulative_sequence_length must be non-decreasing, "
     "got cumulative_sequence_length[1] = 6 > cumulative_sequence_length[2] = 2")),
    (_guard.FAULT_CAPACITY, 4, 2147483647, 1, ("sequence 4: needs positions up to "
     "past_seqlens[4] + q_len = 2147483647 or more + 1, more than the block table's capacity")),
    (_guard.FAULT_MAX_SEQLEN_Q, 2, 5, 4, ("sequence 2: q_len 5 is more than the bound "
     "max_seqlen_q = 4 given")),
    (_guard.FAULT_MAX_SEQLEN_K, 0, 7, 6, ("sequence 0: past_seqlens[0] + q_len = 7 is more "
     "than the bound max_seqlen_k = 6 given")),
    (_guard.FAULT_TOTAL_KV, 3, 17, 16,
     "total_kv_tokens: the metadata needs 17, more than the bound 16 given"),
    (_guard.FAULT_ROTARY, 1, 70, 64,
     "sequence 1: reaches position 70 but cos_cache has only 64 rows"),
    (_guard.FAULT_PAST, 0, -2147483648, 1, "past_seqlens[0] = -2147483648 or less"),
])
def test_error_message_per_fault(bit, seq, v1, v2, text):
    err = _guard.error_from_word(word((bit, seq, v1, v2)))
    assert text in str(err), str(err)
    assert err.whole_batch == bool(bit & _guard.BATCH_FAULTS)
    assert ("the whole batch was stopped" in str(err)) == err.whole_batch
    assert err.sequence == seq and err.values == (v1, v2)


def test_error_with_a_sequence_past_2_31():
    """Slots hold the sequence in the high 32 bits: B up to 2^31 - 1."""
    seq = 2**31 - 2
    err = _guard.error_from_word(word((_guard.FAULT_BLOCK_ID, seq, 0, -9)))
    assert err.sequence == seq and f"block_table[{seq}, 0] = -9" in str(err)


def test_seen_bits_without_a_recorded_call_still_raise():
    w = _guard.clean_word()
    w[_guard.WORD_SEEN] = _guard.FAULT_PAST
    err = _guard.error_from_word(w)
    assert isinstance(err, MetadataError) and err.seen == ("past",) and err.fault is None


# ---------------------------------------------------------------- public surface


def test_check_errors_is_public_and_free_without_a_gpu_call():
    assert cupy_paged.check_errors is _guard.check_errors
    assert cupy_paged.MetadataError is MetadataError
    assert {"check_errors", "MetadataError"} <= set(cupy_paged.__all__)
    code = ("import sys, cupy_paged; assert cupy_paged.check_errors() is None; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupy_backends')]")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_guard_launch_scalars_pack_the_problem():
    from cupy_paged import _validate

    problem = _validate.Problem(
        num_tokens=10, batch=9, num_heads=4, kv_num_heads=2, head_size=64, block_size=16,
        num_blocks=2**40, max_blocks=8, packed=False, dtype="float16", scale=0.125,
        softcap=0.0, window=-1, do_rotary=True, rotary_interleaved=False, rotary_dim=64,
        cos_rows=100, max_seqlen_q=None, max_seqlen_k=2**70, total_kv_tokens=50)
    grid, packed = _guard._packed(problem)
    assert grid == (3,)  # 4 sequences per block
    assert packed.shape == (1,) and packed.dtype == _guard.PARAMS.dtype  # one struct by value
    assert [int(packed[0][n]) for _, n in _guard.PARAMS.scalars] == [
        10, 9, 32, 16, 2**31 - 1, 8, 100, -1, 2**63 - 1, 50]
    assert [packed.dtype.fields[n][0].itemsize for _, n in _guard.PARAMS.scalars] == [
        8, 4, 8, 4, 4, 4, 8, 8, 8, 8]
