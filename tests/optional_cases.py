"""The cases of the optional inputs beyond opset 1 (head sinks, slot_mapping, QK-norm,
rotary_offset, one-byte caches, the latent layout), drawn by paged_cases.make_inputs like
every other case (the latent ones through make_latent_inputs)."""
import dataclasses

try:
    from .paged_cases import Case, Inputs, make_inputs
except ImportError:
    from paged_cases import Case, Inputs, make_inputs


def sink_cases():
    """Cases with a head sink (ONNX Runtime's head_sink input): alone and with GQA, window,
    softcap, rotary, packed QKV, holes, empty sequences and rows that see no key, at sink
    scales from below to far above the logits."""
    return [
        Case("sink-mixed", sink=1.0, N=6, Nkv=2, H=16),
        Case("sink-decode-gqa", sink=2.0, mode="decode", B=5, N=8, Nkv=2, H=16, bs=3),
        Case("sink-prefill-big", sink=30.0, mode="prefill", B=2, N=4, Nkv=4, H=8, bs=5),
        Case("sink-chunk-window-cap", sink=1.0, mode="chunk", W=3, softcap=5.0, q_gain=4.0,
             N=4, Nkv=1, H=16, bs=4, rotary="gptj"),
        Case("sink-packed-holes", sink=0.5, mode="chunk", holes=3, bs=2, B=4, packed=True,
             rotary="neox"),
        Case("sink-empty-rows", sink=1.0, lens=((0, 4), (3, 2), (2, 0)), unmapped=(1,), bs=2,
             N=4, Nkv=2),
        Case("sink-long-decode", sink=1.0, lens=((1, 300), (1, 40), (1, 0)), N=4, Nkv=2,
             H=16, bs=16),
    ]


def optional_input_cases():
    """Cases with slot_mapping, QK-norm and rotary_offset, alone and together (and with a
    head sink, GQA, packed QKV, window, softcap, holes and empty sequences)."""
    return [
        Case("slots-mixed", slots=True, N=6, Nkv=2, H=16, spare=3),
        Case("slots-decode-holes", slots=True, mode="decode", B=5, bs=3, holes=2),
        Case("slots-packed-rotary", slots=True, mode="chunk", packed=True, rotary="gptj",
             bs=4, spare=2),
        Case("qknorm-mixed", qk_norm=True, N=4, Nkv=2, H=16),
        Case("qknorm-rotary-neox", qk_norm=True, mode="chunk", rotary="neox", H=32, N=4, Nkv=1),
        Case("rotoff-8-neox", rot_off=8, rotary="neox", R=8, H=32, mode="chunk"),
        Case("rotoff-16-gptj-packed", rot_off=16, rotary="gptj", R=16, H=32, packed=True),
        Case("all-together", slots=True, qk_norm=True, rot_off=8, rotary="neox", R=16, H=32,
             sink=1.0, W=4, softcap=5.0, q_gain=2.0, N=8, Nkv=2, bs=3, spare=4, holes=1),
        Case("optional-empty-rows", slots=True, qk_norm=True, lens=((0, 4), (3, 2), (2, 0)),
             unmapped=(1,), bs=2, N=4, Nkv=2),
        Case("non-causal-mixed", causal=False, N=6, Nkv=2, H=16),
        Case("non-causal-chunk-holes-cap", causal=False, mode="chunk", holes=2, softcap=5.0,
             q_gain=2.0, bs=3, rotary="neox"),
        Case("non-causal-sink-slots", causal=False, sink=1.0, slots=True, mode="prefill", B=2,
             N=4, Nkv=1, bs=4),
        Case("negative-scale", scale=-0.3, mode="chunk", N=4, Nkv=2),
        Case("negative-scale-cap-window", scale=-1.0, softcap=2.0, W=3, mode="chunk", bs=2),
    ]


def quantized_cases():
    """One-byte caches: int8 and float8_e4m3fn, per-tensor and per-channel scales, K and V of
    different kinds, with GQA, packed QKV, window, softcap, holes, empty rows and a head sink
    (no rotary or QK-norm: the naive loop and the reference compute those keys in different
    orders, which a one-byte rounding could tell apart)."""
    return [
        Case("int8-tensor-mixed", quant="int8", N=6, Nkv=2, H=16),
        Case("int8-channel-decode", quant="int8", per_channel=True, mode="decode", B=5, bs=3),
        Case("fp8-tensor-chunk", quant="float8_e4m3fn", mode="chunk", packed=True, bs=4),
        Case("fp8-channel-window-cap", quant="float8_e4m3fn", per_channel=True, mode="chunk",
             W=3, softcap=5.0, q_gain=2.0, N=4, Nkv=1),
        Case("k-int8-v-fp8-holes", quant="int8", vquant="float8_e4m3fn", mode="chunk", holes=2,
             bs=2, B=4),
        Case("v-only-int8", quant="", vquant="int8", per_channel=True, N=4, Nkv=2),
        Case("int8-sink-empty-rows", quant="int8", sink=1.0, lens=((0, 4), (3, 2), (2, 0)),
             unmapped=(1,), bs=2, N=4, Nkv=2),
    ]


# ---------------------------------------------------------------- the latent (MLA) layout

MLA_SCALE = 192 ** -0.5      # DeepSeek-V3's softmax scale: 1/sqrt of its query head size


@dataclasses.dataclass(frozen=True)
class LatentCase:
    """A latent-layout case: ``base`` (Nkv = 1, H the latent width) drawn by make_inputs, its
    value, value_cache and v_scale dropped; V is the cached key's first ``v_head_size``
    channels. dtypes: those the naive comparison runs in (one-byte caches: float64 only, as
    the naive loop divides by the scale in float64)."""

    name: str
    base: Case
    v_head_size: int
    dtypes: tuple = ("float64", "float32")


def latent(name, Hv=512, dtypes=("float64", "float32"), **fields):
    """A LatentCase of H = 576 (DeepSeek's 512 latent + 64 rope channels) unless told."""
    fields = dict(dict(H=576, N=8, scale=MLA_SCALE), **fields)
    return LatentCase(name, Case(name, Nkv=1, **fields), Hv, dtypes)


ROPE = dict(rotary="neox", rot_off=512, R=64)   # rope on the last 64 of 576 channels
F64 = ("float64",)


def latent_cases():
    """The latent layout with H = 576, Hv = 512 (and a few other widths), N = 8 or 16, alone
    and with everything that composes: rotary on the last 64 channels (rotary_offset=512),
    window, softcap, head sink, slot_mapping, QK-norm, is_causal=False, a negative scale,
    int8 / float8_e4m3fn key caches (per tensor and per channel), ragged batches, decode and
    prefill, holes and rows that see no key."""
    return [
        latent("latent-mixed", N=16),
        latent("latent-decode-rope", mode="decode", B=4, N=16, **ROPE),
        latent("latent-prefill-rope-gptj", mode="prefill", B=2, **dict(ROPE, rotary="gptj")),
        latent("latent-ragged-B5", lens=((1, 30), (7, 0), (0, 12), (3, 17), (1, 0)), bs=4,
               **ROPE),
        latent("latent-chunk-window-cap", mode="chunk", W=5, softcap=10.0, q_gain=2.0,
               **ROPE),
        latent("latent-sink-holes", sink=1.0, mode="chunk", holes=2, bs=4),
        latent("latent-slots-rope", slots=True, spare=3, **ROPE),
        latent("latent-qknorm-rope", qk_norm=True, mode="chunk", **ROPE),
        latent("latent-non-causal", causal=False, mode="chunk", N=16, **ROPE),
        latent("latent-negative-scale", scale=-MLA_SCALE, softcap=5.0),
        latent("latent-hv-equals-h", Hv=576, scale=0.0, mode="chunk"),
        latent("latent-small-H64-Hv32", Hv=32, H=64, N=4, bs=3, rotary="gptj", rot_off=32,
               R=32, mode="chunk"),
        latent("latent-empty-rows", lens=((0, 4), (3, 2), (2, 0)), unmapped=(1,), bs=2,
               sink=1.0),
        latent("latent-all-together", slots=True, qk_norm=True, sink=1.0, W=4, softcap=5.0,
               q_gain=2.0, N=16, bs=3, spare=4, holes=1, **ROPE),
        latent("latent-int8-tensor", quant="int8", vquant="", dtypes=F64),
        latent("latent-int8-channel-decode", quant="int8", vquant="", per_channel=True,
               mode="decode", B=4, N=16, dtypes=F64),
        latent("latent-fp8-tensor-chunk", quant="float8_e4m3fn", vquant="", mode="chunk",
               dtypes=F64),
        latent("latent-fp8-channel-rope-window", quant="float8_e4m3fn", vquant="",
               per_channel=True, W=3, softcap=5.0, mode="chunk", dtypes=F64, **ROPE),
        latent("latent-int8-slots-sink-non-causal", quant="int8", vquant="", slots=True,
               sink=1.0, causal=False, mode="prefill", B=2, dtypes=F64),
    ]


def make_latent_inputs(case, rng):
    """Inputs of a LatentCase: make_inputs of its base, then value = value_cache = None (and
    no v_scale), with kv_cache_layout="latent" and its v_head_size."""
    inp = make_inputs(case.base, rng)
    args = list(inp.args)
    args[2] = args[4] = None
    kwargs = dict(inp.kwargs, kv_cache_layout="latent", v_head_size=case.v_head_size)
    kwargs.pop("v_scale", None)
    return Inputs(tuple(args), kwargs, inp.q_lens, inp.pasts)
