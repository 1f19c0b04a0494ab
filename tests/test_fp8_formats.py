"""Byte-exact tests of the two FP8 KV-cache formats (layouts.kv_cache + cute_mla.quant), CPU only.

Expected bytes and values are built by hand with struct and a pure-Python float8_e4m3fn decoder, so these
tests pin the format itself, not merely quantize/dequantize agreeing with each other.
"""

import math
import struct

import pytest
import torch

from cute_mla.quant import (dequantize_kvcache, empty_kvcache, pack_model1, pack_v32, quantize_kvcache,
                            ue8m0_to_float32, unpack_model1, unpack_v32)
from cute_mla.layouts.kv_cache import FORMATS, MODEL1, V32, format_for_bytes_per_token, format_for_dqk, get_format

NAN = float("nan")


def e4m3(code: int) -> float:
    """Independent float8_e4m3fn decoder: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 7
    if e == 15 and m == 7:
        return NAN
    return sign * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def f32(x: float) -> float:
    """Round a double to float32 (exact products of fp8 * float32 fit a double, so this is one rounding)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16_bits_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def bf16_bits(t: torch.Tensor) -> list:
    return (t.view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


def raw_cache(buf: bytearray, nb: int, pbs: int, bpt: int, stride0: int, dtype=torch.uint8) -> torch.Tensor:
    """A cache tensor over hand-written bytes: blocks stride0 bytes apart, rows bpt bytes apart."""
    t = torch.frombuffer(buf, dtype=torch.uint8).clone()
    return t.as_strided((nb, pbs, 1, bpt), (stride0, bpt, bpt, 1)).view(dtype)


def storage_bytes(cache: torch.Tensor) -> bytes:
    return bytes(cache.untyped_storage())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN positions included."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.nan_to_num(a.float(), 0.0), torch.nan_to_num(b.float(), 0.0))


# ------------------------------------------------------------------------------------------------ layout
def test_layout_offsets():
    assert (V32.d_qk, V32.d_nope, V32.d_rope, V32.d_v, V32.num_scales, V32.bytes_per_token) == (576, 512, 64, 512, 4, 656)
    assert (MODEL1.d_qk, MODEL1.d_nope, MODEL1.d_rope, MODEL1.d_v, MODEL1.num_scales) == (512, 448, 64, 512, 7)
    assert MODEL1.bytes_per_token == 584 and MODEL1.v_includes_rope and not V32.v_includes_rope
    for t in (0, 1, 63):
        assert V32.nope_offset(t) == 656 * t and V32.rope_offset(t) == 656 * t + 528
        assert [V32.scale_offset(t, group=j) for j in range(4)] == [656 * t + 512 + 4 * j for j in range(4)]
        assert MODEL1.nope_offset(t, 64) == 576 * t and MODEL1.rope_offset(t, 64) == 576 * t + 448
        assert [MODEL1.scale_offset(t, 64, j) for j in range(7)] == [64 * 576 + 8 * t + j for j in range(7)]
    assert V32.block_bytes(64) == V32.default_block_stride(64) == 64 * 656
    assert MODEL1.block_bytes(64) == 64 * 584 and MODEL1.default_block_stride(64) == 65 * 576
    assert MODEL1.default_block_stride(1) == 1152 and MODEL1.default_block_stride(2) == 1728
    assert MODEL1.scales_region_offset(64) == 64 * 576
    assert FORMATS == {"V32": V32, "MODEL1": MODEL1}
    assert format_for_dqk(576) is V32 and format_for_dqk(512) is MODEL1
    assert format_for_bytes_per_token(656) is V32 and format_for_bytes_per_token(584) is MODEL1
    assert get_format("model1") is MODEL1 and get_format(V32) is V32
    with pytest.raises(ValueError, match="d_qk"):
        format_for_dqk(128)
    with pytest.raises(ValueError, match="fmt"):
        get_format("V4")
    with pytest.raises(ValueError, match="page_block_size"):
        MODEL1.scale_offset(0)
    with pytest.raises(ValueError, match="group"):
        V32.scale_offset(0, group=4)


def test_decoders_agree_with_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    ref = torch.tensor([e4m3(c) for c in range(256)], dtype=torch.float32)
    assert same(codes.view(torch.float8_e4m3fn).float(), ref)
    e = torch.arange(256, dtype=torch.uint8)
    want = torch.tensor([NAN if i == 255 else math.ldexp(1.0, i - 127) for i in range(256)], dtype=torch.float64)
    assert same(ue8m0_to_float32(e).double(), want)


# ------------------------------------------------------------------------------------------------ V32
def v32_record(codes, scales, rope_bits) -> bytes:
    return bytes(codes) + struct.pack("<4f", *scales) + struct.pack("<64H", *rope_bits)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float8_e4m3fn])
def test_v32_dequant_hand_built(dtype):
    # 2 blocks x 2 tokens, block stride padded by 48 garbage bytes that must be ignored.
    nb, pbs, stride0 = 2, 2, 2 * 656 + 48
    scales = [(0.37, 1.5, -2.0, 1e-3), (3.0e-5, 0.1, 7.0, 1.0), (1.0, 1.0, 1.0, 1.0), (0.999, -0.5, 2.5, 33.3)]
    recs = []
    for i in range(4):
        codes = [(17 * i + 3 * d) % 256 for d in range(512)]  # every code incl. NaNs 0x7F / 0xFF
        rope = [(0x3F80 + 97 * i + 5 * r) & 0xFFFF for r in range(64)]
        rope[0] = 0xC049  # -3.140625
        recs.append((codes, scales[i], rope))
    buf = bytearray(b"\xEE" * (nb * stride0))
    for i, (c, s, r) in enumerate(recs):
        off = (i // pbs) * stride0 + (i % pbs) * 656
        buf[off:off + 656] = v32_record(c, s, r)
    cache = raw_cache(buf, nb, pbs, 656, stride0, dtype)
    out32 = dequantize_kvcache(cache, out_dtype=torch.float32)
    out16 = dequantize_kvcache(cache, "V32")
    assert out32.shape == (2, 2, 1, 576) and out16.dtype == torch.bfloat16
    want = torch.empty(4, 576, dtype=torch.float32)
    for i, (c, s, r) in enumerate(recs):
        for d in range(512):
            v = e4m3(c[d])
            want[i, d] = NAN if math.isnan(v) else f32(v * f32(s[d // 128]))
        for k in range(64):
            want[i, 512 + k] = bf16_bits_value(r[k])
    assert same(out32.reshape(4, 576), want)
    assert same(out16.reshape(4, 576).float(), want.to(torch.bfloat16).float())
    # unpack returns the raw parts
    nope, sc, rope = unpack_v32(cache)
    assert same(sc.reshape(4, 4), torch.tensor([[f32(x) for x in s] for s in scales]))
    assert bf16_bits(rope.reshape(4, 64)) == [r for _, _, r in recs]
    assert torch.equal(nope.view(torch.uint8).reshape(4, 512), torch.tensor([c for c, _, _ in recs], dtype=torch.uint8))


def test_v32_pack_arbitrary_scales_matches_hand_bytes():
    codes = torch.randint(0, 256, (1, 3, 1, 512), dtype=torch.uint8)
    scales = torch.tensor([0.37, -1.25, 6.5e-3, 12345.678], dtype=torch.float32).expand(1, 3, 1, 4).contiguous()
    rope = torch.randn(1, 3, 1, 64).bfloat16()
    cache = pack_v32(codes.view(torch.float8_e4m3fn), scales, rope)
    assert cache.dtype == torch.float8_e4m3fn and cache.shape == (1, 3, 1, 656) and cache.stride() == (1968, 656, 656, 1)
    want = b"".join(v32_record(codes[0, t, 0].tolist(), scales[0, t, 0].tolist(),
                               bf16_bits(rope[0, t, 0])) for t in range(3))
    assert storage_bytes(cache) == want
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(unpack_v32(cache), (codes, scales, rope)))


def test_v32_dequantize_float16_rounds_the_scale_then_the_product_once():
    # The SM90 sparse decode kernels' arithmetic: f16(code * f16(scale)), each rounding to nearest even.
    codes = torch.tensor([0x38, 0xC4, 0x01, 0x7E], dtype=torch.uint8)  # 1.0, -3.0, 2^-9 (subnormal), 448
    nope = codes.repeat(128).reshape(1, 1, 1, 512)
    scales = torch.tensor([[[[1.0 + 2.0 ** -12, 0.1, 3.0e-6, 100.0]]]], dtype=torch.float32)
    rope = torch.randn(1, 1, 1, 64).bfloat16()
    out = dequantize_kvcache(pack_v32(nope.view(torch.float8_e4m3fn), scales, rope), out_dtype=torch.float16)
    assert out.dtype == torch.float16 and out.shape == (1, 1, 1, 576)
    value = {0x38: 1.0, 0xC4: -3.0, 0x01: 2.0 ** -9, 0x7E: 448.0}
    for g, s in enumerate(scales.flatten().tolist()):
        s16 = torch.tensor(s).half().float().item()  # 1 + 2^-12 -> 1.0; 3e-6 -> an f16 subnormal
        for i in range(4):
            want = torch.tensor(value[codes[i].item()] * s16, dtype=torch.float64).half()
            assert out[0, 0, 0, 128 * g + i].item() == want.item()
    assert torch.equal(out[..., 512:], rope.half())
    # 448 * 100 = 44800 fits f16; the exact product 1 * (1 + 2^-12) does not survive f16's scale rounding
    assert out[0, 0, 0, 384 + 3].item() == 44800.0 and out[0, 0, 0, 0].item() == 1.0


def test_v32_quantize_hand_built():
    # One token; each group has a known amax -> known power-of-two scale and codes.
    x = [0.0] * 576
    x[0], x[1], x[2] = 1.0, 0.5, -0.25          # amax 1: scale 2^ceil(log2(1/448)) = 2^-8; codes 256, 128, -64
    # group 1 all zero: amax/448 clamped to 1e-4 -> scale 2^-13, codes 0
    x[256], x[257], x[258] = 448.0, 1.0625, 1.1875  # scale 1; RNE ties: 1.0625 -> 1.0, 1.1875 -> 1.25
    x[384], x[385] = -56.0, 3.0                  # 56/448 = 2^-3 exactly: scale 2^-3 (no extra doubling)
    rope_bits = [(0x3F00 + 3 * r) for r in range(64)]
    for r in range(64):
        x[512 + r] = bf16_bits_value(rope_bits[r])
    kv = torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).reshape(1, 1, 1, 576)
    cache = quantize_kvcache(kv, "V32")
    codes = [0] * 512
    codes[0], codes[1], codes[2] = 0x78, 0x70, 0xE8   # 256 = 2^8, 128 = 2^7, -64 = -2^6
    codes[256], codes[257], codes[258] = 0x7E, 0x38, 0x3A  # 448, 1.0, 1.25
    codes[384], codes[385] = 0xFE, 0x5C               # -448, 24 = 1.5 * 2^4
    want = v32_record(codes, (2.0**-8, 2.0**-13, 1.0, 2.0**-3), rope_bits)
    assert storage_bytes(cache) == want
    # float32 input is accepted too and quantised from its own (here identical) values
    assert storage_bytes(quantize_kvcache(kv.float())) == want


# ------------------------------------------------------------------------------------------------ MODEL1
def test_model1_quantize_hand_built_block_layout():
    nb, pbs = 2, 2
    kv = torch.zeros(nb, pbs, 1, 512, dtype=torch.float32)
    rope = torch.randn(nb, pbs, 1, 64).bfloat16()
    kv[..., 448:] = rope.float()
    for j in range(7):  # token (0, 0): group j has amax 448 * 2^(j-3) -> exponent j-3, byte 124+j
        kv[0, 0, 0, 64 * j] = 448.0 * 2.0 ** (j - 3)
        kv[0, 0, 0, 64 * j + 1] = -224.0 * 2.0 ** (j - 3)
    kv[1, 1, 0, 5] = 1.0  # token (1, 1): group 0 scale 2^-8, code 256; other groups all-zero
    cache = quantize_kvcache(kv.bfloat16())  # fmt inferred from d_qk 512
    stride0 = 1728  # 2 * 584 = 1168 bytes, rounded up to a multiple of 576
    assert cache.shape == (2, 2, 1, 584) and cache.stride() == (stride0, 584, 584, 1)
    want = bytearray(nb * stride0)  # padding (per-token byte and block tail) must be zero
    for b in range(nb):
        for t in range(pbs):
            base = b * stride0
            codes = [0] * 448
            exps = [114] * 7  # all-zero groups: 1e-4 floor -> 2^-13
            if (b, t) == (0, 0):
                for j in range(7):
                    codes[64 * j], codes[64 * j + 1] = 0x7E, 0xF6  # 448, -224
                exps = [124 + j for j in range(7)]
            if (b, t) == (1, 1):
                codes[5], exps[0] = 0x78, 127 - 8
            rb = bf16_bits(rope[b, t, 0])
            want[base + 576 * t: base + 576 * (t + 1)] = bytes(codes) + struct.pack("<64H", *rb)
            want[base + 1152 + 8 * t: base + 1152 + 8 * (t + 1)] = bytes(exps) + b"\x00"
    assert storage_bytes(cache) == bytes(want)
    # unpadded / larger block strides hold the same block bytes
    for s in (1168, 1168 + 16, 4096):
        c = quantize_kvcache(kv.bfloat16(), "MODEL1", block_stride_bytes=s)
        got = storage_bytes(c)
        assert c.stride(0) == s and all(got[b * s: b * s + 1168] == want[b * stride0: b * stride0 + 1168]
                                        for b in range(nb))


def test_model1_dequant_hand_built():
    nb, pbs, stride0 = 2, 3, 3 * 584 + 40  # unaligned odd stride is fine for reading
    exps = [[0, 1, 100, 127, 128, 254, 255], [120, 121, 122, 123, 124, 125, 126], [127] * 7,
            [130, 110, 90, 70, 50, 30, 10], [127, 127, 127, 127, 127, 127, 127], [140] * 7]
    buf = bytearray(b"\xAB" * (nb * stride0))  # garbage in every padding byte
    toks = []
    for i in range(nb * pbs):
        b, t = divmod(i, pbs)
        codes = [(i * 41 + 7 * d) % 256 for d in range(448)]
        codes[0] = 0x38  # 1.0, so group 0 shows the bare scale
        rb = [(0x4000 + 13 * i + r) for r in range(64)]
        base = b * stride0
        buf[base + 576 * t: base + 576 * (t + 1)] = bytes(codes) + struct.pack("<64H", *rb)
        buf[base + 576 * pbs + 8 * t: base + 576 * pbs + 8 * t + 7] = bytes(exps[i])
        toks.append((codes, exps[i], rb))
    for dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn):
        cache = raw_cache(buf, nb, pbs, 584, stride0, dtype)
        out = dequantize_kvcache(cache, out_dtype=torch.float32).reshape(-1, 512)
        want = torch.empty(nb * pbs, 512, dtype=torch.float64)
        for i, (codes, ex, rb) in enumerate(toks):
            for d in range(448):
                e, v = ex[d // 64], e4m3(codes[d])
                want[i, d] = NAN if (e == 255 or math.isnan(v)) else v * math.ldexp(1.0, e - 127)
            for r in range(64):
                want[i, 448 + r] = bf16_bits_value(rb[r])
        # fp8 * 2^k is exact in float32 except overflow past 448 * 2^127 (-> inf) and tiny subnormals
        want32 = want.to(torch.float32)
        assert same(out, want32)
        assert same(dequantize_kvcache(cache, "MODEL1").reshape(-1, 512).float(), want32.to(torch.bfloat16).float())
    nope, e, rp = unpack_model1(cache)
    assert torch.equal(e.reshape(-1, 7), torch.tensor(exps, dtype=torch.uint8))


def test_model1_pack_unpack_roundtrip():
    nope = torch.randint(0, 256, (3, 5, 1, 448), dtype=torch.uint8)
    exps = torch.randint(100, 140, (3, 5, 1, 7), dtype=torch.uint8)
    rope = torch.randn(3, 5, 1, 64).bfloat16()
    cache = pack_model1(nope, exps, rope)
    assert cache.stride() == (6 * 576, 584, 584, 1)  # 5 * 584 = 2920 bytes, rounded up to 3456 = 6 * 576
    n, e, r = unpack_model1(cache)
    assert torch.equal(n.view(torch.uint8), nope) and torch.equal(e, exps) and torch.equal(r.view(torch.int16),
                                                                                          rope.view(torch.int16))
    if hasattr(torch, "float8_e8m0fnu"):  # the native ue8m0 dtype is accepted as the same bytes
        c2 = pack_model1(nope, exps.view(torch.float8_e8m0fnu), rope)
        assert storage_bytes(c2) == storage_bytes(cache)


# ------------------------------------------------------------------------------------------------ both
def rand_kv(nb, pbs, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(nb, pbs, 1, d, generator=g) / 10).clamp(-1, 1).to(torch.bfloat16)


@pytest.mark.parametrize("fmt", ["V32", "MODEL1"])
def test_roundtrip_within_fp8_precision(fmt):
    f = FORMATS[fmt]
    kv = rand_kv(4, 64, f.d_qk)
    kv[1, 3] *= 1e-3  # exercises the 1e-4 scale floor (subnormal codes)
    cache = quantize_kvcache(kv, fmt)
    out = dequantize_kvcache(cache, fmt, out_dtype=torch.float32)
    x = kv.float()
    g = x[..., :f.d_nope].unflatten(-1, (-1, f.nope_group))
    scale = torch.exp2(torch.ceil(torch.log2(torch.clamp_min(g.abs().amax(-1, keepdim=True) / 448, 1e-4))))
    # half an fp8 ulp: 2^-4 relative for normal codes, 2^-10 * scale for subnormal ones
    bound = torch.maximum(g.abs() * 2.0**-4, scale * 2.0**-10).flatten(-2)
    assert ((out[..., :f.d_nope] - x[..., :f.d_nope]).abs() <= bound).all()
    assert torch.equal(out[..., f.d_nope:], x[..., f.d_nope:])  # RoPE is stored raw
    assert torch.equal(dequantize_kvcache(cache, fmt).float(), out)  # fp8 * 2^k is exact in bf16
    # dequantised values are fixed points of the quantiser
    assert torch.equal(dequantize_kvcache(quantize_kvcache(out, fmt), fmt, out_dtype=torch.float32), out)
    # a padded block stride and a sub-batch of blocks give the same bytes per block
    s = f.block_bytes(64) + 64 * 16
    padded = quantize_kvcache(kv, fmt, block_stride_bytes=s)
    assert padded.stride() == (s, f.bytes_per_token, f.bytes_per_token, 1)
    assert torch.equal(dequantize_kvcache(padded, out_dtype=torch.float32), out)
    part = quantize_kvcache(kv[2:3], fmt)
    assert torch.equal(part.view(torch.uint8), cache[2:3].view(torch.uint8))


@pytest.mark.parametrize("fmt", ["V32", "MODEL1"])
def test_nan_stays_in_its_token_and_group(fmt):
    f = FORMATS[fmt]
    kv = rand_kv(2, 8, f.d_qk, seed=1)
    bad = kv.clone()
    bad[1, 3, 0, f.nope_group + 2] = NAN   # NoPE group 1 of token (1, 3)
    bad[0, 5, 0, f.d_nope + 7] = NAN       # RoPE of token (0, 5)
    bad[0, 6, 0, 0] = float("inf")          # group 0 of token (0, 6)
    clean_c, bad_c = quantize_kvcache(kv, fmt), quantize_kvcache(bad, fmt)
    unpack = unpack_v32 if fmt == "V32" else unpack_model1
    (cn, cs, cr), (bn, bs, br) = unpack(clean_c), unpack(bad_c)
    cn, bn = cn.view(torch.uint8).unflatten(-1, (-1, f.nope_group)), bn.view(torch.uint8).unflatten(-1, (-1, f.nope_group))
    poisoned = {(1, 3, 1), (0, 6, 0)}
    for b in range(2):
        for t in range(8):
            for j in range(f.num_scales):
                if (b, t, j) in poisoned:
                    assert (bn[b, t, 0, j] == 0x7F).all()
                    assert math.isnan(bs[b, t, 0, j]) if fmt == "V32" else bs[b, t, 0, j] == 255
                else:
                    assert torch.equal(bn[b, t, 0, j], cn[b, t, 0, j])
                    assert torch.equal(bs[b, t, 0, j:j + 1].view(torch.uint8), cs[b, t, 0, j:j + 1].view(torch.uint8))
    assert br.isnan().nonzero().tolist() == [[0, 5, 0, 7]]
    out, ref = dequantize_kvcache(bad_c, out_dtype=torch.float32), dequantize_kvcache(clean_c, out_dtype=torch.float32)
    nanmask = torch.zeros_like(out, dtype=torch.bool)
    nanmask[1, 3, 0, f.nope_group:2 * f.nope_group] = True
    nanmask[0, 6, 0, :f.nope_group] = True
    nanmask[0, 5, 0, f.d_nope + 7] = True
    assert torch.equal(out.isnan(), nanmask)
    assert torch.equal(out[~nanmask], ref[~nanmask])


def test_bad_inputs():
    kv = rand_kv(1, 4, 576)
    with pytest.raises(TypeError, match="kv"):
        quantize_kvcache(kv.to(torch.int32))
    with pytest.raises(TypeError, match="kv"):
        quantize_kvcache([1, 2])
    with pytest.raises(ValueError, match="kv"):
        quantize_kvcache(kv[0])
    with pytest.raises(ValueError, match="kv"):
        quantize_kvcache(kv.expand(1, 4, 2, 576))
    with pytest.raises(ValueError, match="d_qk"):
        quantize_kvcache(kv, "MODEL1")
    with pytest.raises(ValueError, match="d_qk"):
        quantize_kvcache(kv[..., :500])
    with pytest.raises(ValueError, match="fmt"):
        quantize_kvcache(kv, "FP4")
    with pytest.raises(ValueError, match="block_stride_bytes"):
        quantize_kvcache(kv, block_stride_bytes=4 * 656 - 16)
    with pytest.raises(ValueError, match="block_stride_bytes"):
        quantize_kvcache(rand_kv(1, 4, 512), block_stride_bytes=4 * 584 + 8)  # not 16-byte aligned
    with pytest.raises(TypeError, match="block_stride_bytes"):
        quantize_kvcache(kv, block_stride_bytes=4000.0)
    cache = quantize_kvcache(kv)
    with pytest.raises(TypeError, match="cache"):
        dequantize_kvcache(cache.view(torch.uint8).float())
    with pytest.raises(ValueError, match="584"):
        dequantize_kvcache(cache, "MODEL1")
    with pytest.raises(ValueError, match="last dim"):
        dequantize_kvcache(cache.view(torch.uint8)[..., :600])
    with pytest.raises(ValueError, match="cache"):
        dequantize_kvcache(cache[0])
    with pytest.raises(ValueError, match="strides"):
        dequantize_kvcache(cache[:, ::2])
    with pytest.raises(ValueError, match="block stride"):
        u = torch.zeros(4 * 656 + 2 * 584, dtype=torch.uint8)
        dequantize_kvcache(u.as_strided((2, 4, 1, 584), (584, 584, 584, 1)))
    with pytest.raises(TypeError, match="out_dtype"):
        dequantize_kvcache(cache, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="scales"):
        pack_v32(torch.zeros(1, 2, 1, 512, dtype=torch.uint8), torch.zeros(1, 2, 1, 4, dtype=torch.float64),
                 torch.zeros(1, 2, 1, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rope"):
        pack_model1(torch.zeros(1, 2, 1, 448, dtype=torch.uint8), torch.zeros(1, 2, 1, 7, dtype=torch.uint8),
                    torch.zeros(1, 3, 1, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="page_block_size"):
        empty_kvcache(2, 0, "V32")


def test_sparse_decode_matmul_type_per_format_and_override(monkeypatch):
    """V32 runs its matmuls in f16 and MODEL1 in bf16 unless CUTE_MLA_SPARSE_DECODE_MATMUL says otherwise;
    any other value is refused with the variable named."""
    from cute_mla import ops, registry

    env = registry.SPARSE_DECODE_MATMUL_ENV
    monkeypatch.delenv(env, raising=False)
    assert (ops.sparse_decode_matmul("V32"), ops.sparse_decode_matmul("MODEL1")) == ("f16", "bf16")
    monkeypatch.setenv(env, "auto")
    assert (ops.sparse_decode_matmul("V32"), ops.sparse_decode_matmul("MODEL1")) == ("f16", "bf16")
    for forced in registry.SPARSE_DECODE_MATMULS:
        monkeypatch.setenv(env, forced)
        assert ops.sparse_decode_matmul("V32") == ops.sparse_decode_matmul("MODEL1") == forced
    monkeypatch.setenv(env, "BF16")
    with pytest.raises(ValueError, match=env):
        ops.sparse_decode_matmul("V32")
