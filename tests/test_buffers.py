"""The buffers themselves (docs/semantics.md, "Buffers"): the arrays a call writes must be
writable and share no byte with any other argument, and a call that fails leaves every array
as it was.

NumPy input runs end to end; the GPU rule (pointer ranges, alignment) is checked on stand-in
arrays carrying only what ``_buffers.check_buffers`` reads of a CuPy array, so it runs here.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from cupy_paged import _buffers, reference
from test_validation import H, N, T, all_of, arg, call, make_case

WRITTEN = _buffers.WRITTEN
ARRAYS = WRITTEN + _buffers.READ


def full_case(seed):
    """A valid rotary call with every array given, ``out`` and the optional inputs too (but
    k_scale / v_scale, which need one-byte caches: tests/test_quantized_cache.py)."""
    kw = make_case(rotary=True, seed=seed)
    rng = np.random.default_rng(seed)
    kw["out"] = rng.standard_normal((T, N * H)).astype(np.float32)
    kw["head_sink"] = rng.standard_normal(N).astype(kw["query"].dtype)
    kw["q_norm_weight"] = rng.standard_normal(H).astype(kw["query"].dtype)
    kw["k_norm_weight"] = rng.standard_normal(H).astype(kw["query"].dtype)
    kw["slot_mapping"] = table_slots(kw)
    return kw


def table_slots(kw):
    """The slot_mapping that writes where block_table would: block * block_size + offset."""
    cum, past = kw["cumulative_sequence_length"], kw["past_seqlens"]
    table, bs = kw["block_table"], kw["key_cache"].shape[1]
    slots = []
    for b in range(len(past)):
        for j in range(int(cum[b + 1] - cum[b])):
            p = int(past[b]) + j
            block = int(table[b, p // bs])
            slots.append(-1 if block < 0 else block * bs + p % bs)
    return np.array(slots, np.int32)


def snapshot(kw):
    return {n: kw[n].copy() for n in ARRAYS if kw.get(n) is not None}


def assert_unchanged(kw, before):
    for name, old in before.items():
        np.testing.assert_array_equal(kw[name], old, err_msg=f"{name} changed by a failing call")


# ---- read-only arrays the call writes -------------------------------------------------------

@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("name", WRITTEN)
def test_read_only_written_array_is_refused_before_any_write(name, seed):
    kw = full_case(seed)
    kw[name].flags.writeable = False
    before = snapshot(kw)
    with pytest.raises(ValueError, match=all_of(arg(name), "read-only", "writeable is False")):
        call(kw)
    assert_unchanged(kw, before)


class DLPackExport:
    """A host array seen only through DLPack, as torch CPU tensors are (optionally read-only:
    DLPack 1.0 carries the flag and NumPy's adoption keeps it)."""

    def __init__(self, array, read_only=False):
        self.array = array
        if read_only:
            array.flags.writeable = False

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


@pytest.mark.parametrize("name", WRITTEN)
def test_read_only_dlpack_export_is_refused(name):
    kw = full_case(3)
    before = snapshot(kw)
    kw[name] = DLPackExport(kw[name], read_only=True)
    with pytest.raises(ValueError, match=all_of(arg(name), "read-only")):
        call(kw)
    kw[name] = kw[name].array
    assert_unchanged(kw, before)


def test_writable_dlpack_exports_are_written_in_place():
    plain, exported = full_case(4), full_case(4)
    expected = call(plain)
    for name in WRITTEN:
        exported[name] = DLPackExport(exported[name])
    call(exported)
    for name in WRITTEN:
        np.testing.assert_array_equal(exported[name].array, plain[name], err_msg=name)
    np.testing.assert_array_equal(plain["out"], expected)


# ---- aliasing -------------------------------------------------------------------------------

def view_into(host, guest, rng):
    """A view of ``host``'s bytes, at a random 4-byte offset, with ``guest``'s shape, dtype
    and values (so the call would run if nothing checked the memory)."""
    raw = host.reshape(-1).view(np.uint8)
    offset = int(rng.integers(0, raw.size - guest.nbytes + 1)) // 4 * 4
    view = raw[offset:offset + guest.nbytes].view(guest.dtype).reshape(guest.shape)
    view[...] = guest
    return view


# every array full_case gives (the scales' overlap: tests/test_quantized_cache.py)
IN_CASE = [n for n in ARRAYS if n not in ("k_scale", "v_scale")]
PAIRS = [(w, o) for i, w in enumerate(WRITTEN) for o in IN_CASE[i + 1:]]


@pytest.mark.parametrize("written, other", PAIRS, ids=[f"{w}-{o}" for w, o in PAIRS])
def test_written_array_sharing_memory_is_refused_before_any_write(written, other):
    rng = np.random.default_rng(len(written) * 31 + len(other))
    kw = full_case(int(rng.integers(1 << 16)))
    if kw[written].nbytes >= kw[other].nbytes:
        kw[other] = view_into(kw[written], kw[other], rng)
    else:
        kw[written] = view_into(kw[other], kw[written], rng)
    before = snapshot(kw)
    with pytest.raises(ValueError, match=all_of(arg(written), arg(other), "shared")):
        call(kw)
    assert_unchanged(kw, before)


def test_key_cache_is_value_cache_is_refused():
    kw = full_case(5)
    kw["value_cache"] = kw["key_cache"]
    before = snapshot(kw)
    with pytest.raises(ValueError, match=all_of(arg("key_cache"), arg("value_cache"),
                                                "the same array", "two separate caches")):
        call(kw)
    assert_unchanged(kw, before)


@pytest.mark.parametrize("gap", [-1, 0, 3], ids=["one-element-overlap", "adjacent", "apart"])
def test_caches_cut_from_one_buffer(gap):
    """Caches from one allocation: one shared element is refused; touching ones are fine."""
    plain, kw = make_case(seed=6), make_case(seed=6)
    n = kw["key_cache"].size
    buf = np.empty(2 * n + gap, np.float32)
    kw["key_cache"] = buf[:n].reshape(plain["key_cache"].shape)
    kw["value_cache"] = buf[n + gap:2 * n + gap].reshape(plain["value_cache"].shape)
    kw["key_cache"][...] = plain["key_cache"]
    kw["value_cache"][...] = plain["value_cache"]
    if gap < 0:
        with pytest.raises(ValueError, match=all_of(arg("key_cache"), arg("value_cache"))):
            call(kw)
        return
    np.testing.assert_array_equal(call(kw), call(plain))
    np.testing.assert_array_equal(kw["value_cache"], plain["value_cache"])


def test_arrays_only_read_may_share_memory():
    plain, kw = make_case(seed=7), make_case(seed=7)
    plain["value"] = plain["key"].copy()
    kw["value"] = kw["key"]                                   # one array read twice
    meta = np.concatenate([kw["cumulative_sequence_length"], kw["past_seqlens"]])
    b = len(kw["past_seqlens"])
    kw["cumulative_sequence_length"], kw["past_seqlens"] = meta[:b + 1], meta[b + 1:]
    np.testing.assert_array_equal(call(kw), call(plain))


# ---- the GPU rule on stand-ins ----------------------------------------------------------------

def gpu_array(ptr, nbytes):
    """What check_buffers reads of a CuPy array: data.ptr and nbytes."""
    return SimpleNamespace(data=SimpleNamespace(ptr=ptr), nbytes=nbytes)


def first_overlap(spans):
    """The first (written, other) pair whose byte ranges meet, by brute force."""
    names = [n for n in ARRAYS if spans.get(n) is not None and spans[n][1] > 0]
    for i, w in enumerate(names):
        for o in names[i + 1:]:
            (wp, wn), (op, on) = spans[w], spans[o]
            if w in WRITTEN and wp < op + on and op < wp + wn:
                return w, o
    return None


@pytest.mark.parametrize("seed", range(40))
def test_gpu_pointer_ranges_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    slots = 64 if seed % 2 else 2048     # a small arena (overlaps, touching) or a roomy one
    spans = {}
    for name in ARRAYS:
        optional = name in ("key", "value", "cos_cache", "sin_cache", "out")
        if optional and rng.random() < 0.3:
            spans[name] = None
        else:
            nbytes = int(rng.choice([0, 16, 64, 256, 1024]))
            spans[name] = (int(rng.integers(1, slots)) * 16 + (1 << 40), nbytes)
    a = {n: None if s is None else gpu_array(*s) for n, s in spans.items()}
    pair = first_overlap(spans)
    if pair is None:
        _buffers.check_buffers(a, "cupy")
        return
    with pytest.raises(ValueError, match=all_of(rf"^{pair[0]}:", arg(pair[1]), "shared")):
        _buffers.check_buffers(a, "cupy")


def _disjoint_gpu_arrays():
    return {name: gpu_array((i + 1) << 20, 4096) for i, name in enumerate(ARRAYS)}


@pytest.mark.parametrize("name", ["query", "key", "value", "key_cache", "value_cache", "out"])
def test_gpu_vector_arrays_must_be_16_byte_aligned(name):
    a = _disjoint_gpu_arrays()
    a[name].data.ptr += 4
    _buffers.check_buffers(a, "cupy")                # the host reference does not care
    with pytest.raises(ValueError, match=all_of(rf"^{name}:", "16-byte aligned", "0x")):
        _buffers.check_buffers(a, "cupy", aligned=True)


@pytest.mark.parametrize("name", ["cumulative_sequence_length", "past_seqlens", "block_table",
                                  "cos_cache"])
def test_gpu_scalar_arrays_need_no_alignment(name):
    a = _disjoint_gpu_arrays()
    a[name].data.ptr += 4
    _buffers.check_buffers(a, "cupy", aligned=True)


# ---- nothing half-written ---------------------------------------------------------------------

class Interrupt(BaseException):
    """Not an Exception, as KeyboardInterrupt is not."""


@pytest.mark.parametrize("seed", range(2))
def test_failure_after_the_cache_write_restores_the_caches(seed, monkeypatch):
    kw = full_case(seed)
    before = snapshot(kw)
    seen = {}

    def fail(q, key_cache, value_cache, *args):
        seen["written"] = not np.array_equal(key_cache, before["key_cache"])
        raise Interrupt

    monkeypatch.setattr(reference, "_attend_sequences", fail)
    with pytest.raises(Interrupt):
        call(kw)
    assert seen == {"written": True}                  # it failed after writing, and yet:
    assert_unchanged(kw, before)


def test_numpy_error_settings_do_not_interrupt_a_call():
    """exp underflows on ordinary input: with numpy.seterr(all="raise") in force the call
    still completes (IEEE results, like the kernels) and gives the same output."""
    plain, strict = make_case(seed=8), make_case(seed=8)
    plain["scale"] = strict["scale"] = 40.0           # large logits: exp(s - max) underflows
    expected = call(plain)
    with np.errstate(all="raise"):
        got = call(strict)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(strict["key_cache"], plain["key_cache"])
