"""Quantise / dequantise / pack / unpack the FP8 paged KV caches (torch only, any device).

The byte formats are defined in ``layouts.kv_cache`` (read its docstring first); this module only moves bytes
according to it.

Cache tensor convention (same as FlashMLA's, so caches are interchangeable): a ``torch.float8_e4m3fn`` tensor
of shape ``[num_blocks, page_block_size, 1, bytes_per_token]`` (656 for V32, 584 for MODEL1) with strides
``(block_stride_bytes, bytes_per_token, bytes_per_token, 1)``. Each page block is therefore
``page_block_size * bytes_per_token`` contiguous bytes, and blocks sit ``block_stride_bytes`` apart in one
allocation. For V32, row ``[blk, t, 0, :]`` is token t's 656-byte record. For MODEL1 the rows are only a
container: the block's bytes are NoPE+RoPE records of 576 bytes followed by 8-byte scale records, so row t does
not hold token t. Default block strides: V32 ``page_block_size * 656`` (contiguous); MODEL1 the block bytes
rounded up to a multiple of 576, exactly as FlashMLA's reference quantiser allocates. Padding bytes are zero.

Readers accept float8_e4m3fn, int8 or uint8 caches (same bytes) with any block stride, as long as the last
dim is contiguous and the dim-1 stride equals bytes_per_token (a whole block contiguous, as the kernels need).
Multi-byte fields are read and written in host byte order, which is little-endian on every torch platform
with CUDA, i.e. the GPU's order.
"""

from __future__ import annotations

import torch

from cute_mla.layouts.kv_cache import (FP8_E4M3_MAX, SCALE_FLOOR, UE8M0_BIAS, UE8M0_NAN, MODEL1, V32,
                                       Fp8CacheFormat, format_for_bytes_per_token, format_for_dqk, get_format)

__all__ = [
    "quantize_kvcache", "dequantize_kvcache", "quantize_v32", "dequantize_v32", "quantize_model1",
    "dequantize_model1", "pack_v32", "unpack_v32", "pack_model1", "unpack_model1", "empty_kvcache",
    "ue8m0_to_float32",
]

_CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)
_KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8_NAN_CODE = 0x7F  # canonical positive NaN of float8_e4m3fn
# torch >= 2.7 has a native ue8m0 dtype; accept it for scale exponents when present.
_UE8M0_DTYPES = tuple(d for d in (torch.uint8, getattr(torch, "float8_e8m0fnu", None)) if d is not None)


# ---------------------------------------------------------------------------------------------- validation
def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_kv(kv, fmt) -> tuple[torch.Tensor, Fp8CacheFormat]:
    kv = _check_tensor(kv, "kv")
    if kv.dtype not in _KV_DTYPES:
        raise TypeError(f"kv must have dtype bfloat16 (or float16/float32), got {kv.dtype}")
    if kv.dim() != 4 or kv.shape[2] != 1:
        raise ValueError(f"kv must have shape [num_blocks, page_block_size, 1, d_qk], got {tuple(kv.shape)}")
    f = format_for_dqk(kv.shape[3]) if fmt is None else get_format(fmt)
    if kv.shape[3] != f.d_qk:
        raise ValueError(f"kv has d_qk={kv.shape[3]} but fmt={f.name} needs d_qk={f.d_qk}")
    if kv.shape[1] == 0:
        raise ValueError("kv must have page_block_size >= 1")
    return kv, f


def _check_cache(cache, fmt) -> tuple[torch.Tensor, Fp8CacheFormat]:
    """Validate an FP8 cache and return it viewed as uint8 (no copy) with its format."""
    cache = _check_tensor(cache, "cache")
    if cache.dtype not in _CACHE_DTYPES:
        raise TypeError(f"cache must have dtype float8_e4m3fn, int8 or uint8, got {cache.dtype}")
    if cache.dim() != 4 or cache.shape[2] != 1:
        raise ValueError(
            f"cache must have shape [num_blocks, page_block_size, 1, bytes_per_token], got {tuple(cache.shape)}")
    f = format_for_bytes_per_token(cache.shape[3]) if fmt is None else get_format(fmt)
    nb, pbs, _, bpt = cache.shape
    if bpt != f.bytes_per_token:
        raise ValueError(f"cache has last dim {bpt} but fmt={f.name} needs {f.bytes_per_token} bytes per token")
    if pbs == 0:
        raise ValueError("cache must have page_block_size >= 1")
    if cache.stride(3) != 1 or (pbs > 1 and cache.stride(1) != bpt):
        raise ValueError(
            f"cache must hold each page block contiguously: strides (any, {bpt}, any, 1) expected, "
            f"got {cache.stride()}")
    if nb > 1 and cache.stride(0) < f.block_bytes(pbs):
        raise ValueError(
            f"cache block stride {cache.stride(0)} is smaller than one {f.name} block "
            f"({f.block_bytes(pbs)} bytes for page_block_size={pbs})")
    return cache.view(torch.uint8), f


def _check_part(t, name: str, lead: "tuple | None", last: int, dtypes: tuple) -> torch.Tensor:
    """Check a pack_* input is ``[*lead, 1, last]`` (lead None: any [num_blocks, page_block_size])."""
    t = _check_tensor(t, name)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    lead = tuple(t.shape[:2]) if lead is None and t.dim() == 4 else lead
    want = (*(lead or ("num_blocks", "page_block_size")), 1, last)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {list(want)}, got {list(t.shape)}")
    return t


# ---------------------------------------------------------------------------------------------- raw layout
def empty_kvcache(num_blocks: int, page_block_size: int, fmt="V32", device=None,
                  block_stride_bytes: int | None = None) -> torch.Tensor:
    """Zero-filled FP8 cache with the module's tensor convention (padding included, so it is zero too)."""
    f = get_format(fmt)
    if not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
    if block_stride_bytes is None:
        block_stride_bytes = f.default_block_stride(page_block_size)
    f.check_block_stride(page_block_size, block_stride_bytes)
    flat = torch.zeros(num_blocks, block_stride_bytes, dtype=torch.uint8, device=device)
    blocks = flat[:, :f.block_bytes(page_block_size)]
    return blocks.view(num_blocks, page_block_size, 1, f.bytes_per_token).view(torch.float8_e4m3fn)


def _blocks(u8: torch.Tensor, f: Fp8CacheFormat) -> torch.Tensor:
    """[num_blocks, block_bytes] uint8 view of a validated cache (shares memory, so writes go through)."""
    nb, pbs = u8.shape[:2]
    return u8.as_strided((nb, f.block_bytes(pbs)), (u8.stride(0), 1), u8.storage_offset())


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def _views_v32(u8: torch.Tensor):
    """(nope codes, scale bytes, rope bytes) uint8 views of a V32 cache, each [nb, pbs, n]."""
    rec = u8[:, :, 0, :]
    s0, r0 = V32.scale_offset(0, group=0), V32.rope_offset(0)
    return rec[..., :V32.d_nope], rec[..., s0:r0], rec[..., r0:]


def _views_model1(u8: torch.Tensor):
    """(nope codes, scale exponent bytes, rope bytes) uint8 views of a MODEL1 cache, each [nb, pbs, n]."""
    nb, pbs = u8.shape[:2]
    blk = _blocks(u8, MODEL1)
    data = blk[:, :MODEL1.scales_region_offset(pbs)].view(nb, pbs, MODEL1.data_token_stride)
    scales = blk[:, MODEL1.scales_region_offset(pbs):].view(nb, pbs, MODEL1.scale_slot_bytes)
    r0 = MODEL1.rope_offset(0)
    return data[..., :r0], scales[..., :MODEL1.num_scales], data[..., r0:]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of t's last dim: [..., n] of k-byte elements -> [..., n*k] uint8."""
    return t.contiguous().view(torch.uint8)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return b.contiguous().view(dtype)


def pack_v32(nope: torch.Tensor, scales: torch.Tensor, rope: torch.Tensor,
             block_stride_bytes: int | None = None) -> torch.Tensor:
    """Assemble a V32 cache from its parts, byte for byte.

    nope: ``[nb, pbs, 1, 512]`` float8_e4m3fn (or uint8/int8 raw codes); scales: ``[nb, pbs, 1, 4]`` float32,
    any values (need not be powers of two); rope: ``[nb, pbs, 1, 64]`` bfloat16.
    """
    nope = _check_part(nope, "nope", None, V32.d_nope, _CACHE_DTYPES)
    nb, pbs = nope.shape[:2]
    scales = _check_part(scales, "scales", (nb, pbs), V32.num_scales, (torch.float32,))
    rope = _check_part(rope, "rope", (nb, pbs), V32.d_rope, (torch.bfloat16,))
    cache = empty_kvcache(nb, pbs, V32, nope.device, block_stride_bytes)
    n, s, r = _views_v32(cache.view(torch.uint8))
    n.copy_(_codes(nope)[:, :, 0])
    s.copy_(_as_bytes(scales[:, :, 0]))
    r.copy_(_as_bytes(rope[:, :, 0]))
    return cache


def unpack_v32(cache: torch.Tensor):
    """Split a V32 cache into (nope ``[.., 512]`` float8_e4m3fn, scales ``[.., 4]`` float32, rope ``[.., 64]``
    bfloat16), each ``[nb, pbs, 1, n]`` and freshly allocated."""
    u8, _ = _check_cache(cache, V32)
    n, s, r = _views_v32(u8)
    return (n.contiguous().view(torch.float8_e4m3fn).unsqueeze(2),
            _from_bytes(s, torch.float32).unsqueeze(2),
            _from_bytes(r, torch.bfloat16).unsqueeze(2))


def pack_model1(nope: torch.Tensor, scale_exponents: torch.Tensor, rope: torch.Tensor,
                block_stride_bytes: int | None = None) -> torch.Tensor:
    """Assemble a MODEL1 cache from its parts, byte for byte.

    nope: ``[nb, pbs, 1, 448]`` float8_e4m3fn (or uint8/int8 raw codes); scale_exponents: ``[nb, pbs, 1, 7]``
    uint8 ue8m0 bytes (scale = 2^(e-127)); rope: ``[nb, pbs, 1, 64]`` bfloat16. Padding bytes are zero.
    """
    nope = _check_part(nope, "nope", None, MODEL1.d_nope, _CACHE_DTYPES)
    nb, pbs = nope.shape[:2]
    scale_exponents = _check_part(scale_exponents, "scale_exponents", (nb, pbs), MODEL1.num_scales, _UE8M0_DTYPES)
    rope = _check_part(rope, "rope", (nb, pbs), MODEL1.d_rope, (torch.bfloat16,))
    cache = empty_kvcache(nb, pbs, MODEL1, nope.device, block_stride_bytes)
    n, s, r = _views_model1(cache.view(torch.uint8))
    n.copy_(_codes(nope)[:, :, 0])
    s.copy_(_codes(scale_exponents)[:, :, 0])
    r.copy_(_as_bytes(rope[:, :, 0]))
    return cache


def unpack_model1(cache: torch.Tensor):
    """Split a MODEL1 cache into (nope ``[.., 448]`` float8_e4m3fn, scale exponents ``[.., 7]`` uint8 ue8m0,
    rope ``[.., 64]`` bfloat16), each ``[nb, pbs, 1, n]`` and freshly allocated."""
    u8, _ = _check_cache(cache, MODEL1)
    n, s, r = _views_model1(u8)
    return (n.contiguous().view(torch.float8_e4m3fn).unsqueeze(2), s.contiguous().unsqueeze(2),
            _from_bytes(r, torch.bfloat16).unsqueeze(2))


def ue8m0_to_float32(e: torch.Tensor) -> torch.Tensor:
    """Decode ue8m0 bytes to float32 exactly: 2^(e-127), 255 -> NaN (built from bits: exp2 need not be exact)."""
    e = _codes(e).to(torch.int32)
    bits = torch.where(e == 0, torch.full_like(e, 1 << 22), e << 23)  # 2^-127 is a float32 subnormal
    bits = torch.where(e == UE8M0_NAN, torch.full_like(e, 0x7FC00000), bits)
    return bits.view(torch.float32)


# ---------------------------------------------------------------------------------------------- quantisation
def _quantize_groups(x: torch.Tensor, group: int):
    """Reference rule on x ``[..., d_nope]`` (float): returns (codes uint8 ``[..., d_nope]``, exponents int32
    ``[..., d_nope // group]``, finite mask) with scale = 2^exponent; the exponent is meaningless where the group
    holds NaN/inf (mask False), and such a group's codes are all NaN."""
    g = x.float().unflatten(-1, (-1, group))
    y = torch.clamp_min(g.abs().amax(-1) / FP8_E4M3_MAX, SCALE_FLOOR)  # NaN propagates through both
    finite = torch.isfinite(y)
    # ceil(log2(y)) exactly, without a rounded log2: y = m * 2^e with m in [0.5, 1), a power of two iff m == 0.5.
    m, e = torch.frexp(torch.where(finite, y, torch.ones_like(y)))
    k = e - (m == 0.5).to(e.dtype)
    scale = ((k + UE8M0_BIAS) << 23).view(torch.float32)  # 2^k from bits; k is in [-13, 119], a normal float
    # Division by a power of two is exact, and |x / scale| <= 448, so the fp8 cast (round to nearest even)
    # never saturates: the codes are the same on CPU and GPU.
    codes = (g / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(torch.uint8)
    codes = torch.where(finite.unsqueeze(-1), codes, torch.full_like(codes, _FP8_NAN_CODE))
    return codes.flatten(-2), k, finite


def quantize_v32(kv: torch.Tensor, block_stride_bytes: int | None = None) -> torch.Tensor:
    """Quantise ``[nb, pbs, 1, 576]`` K rows into a V32 cache (see quantize_kvcache)."""
    kv, f = _check_kv(kv, V32)
    codes, k, finite = _quantize_groups(kv[..., :f.d_nope], f.nope_group)
    scales = ((k + UE8M0_BIAS) << 23).view(torch.float32)
    scales = torch.where(finite, scales, torch.full_like(scales, float("nan")))
    return pack_v32(codes, scales, kv[..., f.d_nope:].to(torch.bfloat16), block_stride_bytes)


def quantize_model1(kv: torch.Tensor, block_stride_bytes: int | None = None) -> torch.Tensor:
    """Quantise ``[nb, pbs, 1, 512]`` K rows into a MODEL1 cache (see quantize_kvcache)."""
    kv, f = _check_kv(kv, MODEL1)
    codes, k, finite = _quantize_groups(kv[..., :f.d_nope], f.nope_group)
    exps = torch.where(finite, k + UE8M0_BIAS, torch.full_like(k, UE8M0_NAN)).to(torch.uint8)
    return pack_model1(codes, exps, kv[..., f.d_nope:].to(torch.bfloat16), block_stride_bytes)


def quantize_kvcache(kv: torch.Tensor, fmt: "str | Fp8CacheFormat | None" = None,
                     block_stride_bytes: int | None = None) -> torch.Tensor:
    """Quantise a paged K cache ``[num_blocks, page_block_size, 1, d_qk]`` into an FP8 cache.

    fmt: "V32" (d_qk 576) or "MODEL1" (d_qk 512); None picks it from d_qk. Per token and NoPE group,
    scale = 2^ceil(log2(max(amax / 448, 1e-4))) and code = fp8_e4m3fn(x / scale); RoPE is stored as bf16 (raw
    bytes for bf16 input). A group holding NaN/inf gets NaN codes and a NaN scale (ue8m0 byte 255); other
    groups and tokens are unaffected. Returns a float8_e4m3fn tensor ``[num_blocks, page_block_size, 1,
    bytes_per_token]`` with strides ``(block_stride_bytes, bytes_per_token, bytes_per_token, 1)``; see the
    module docstring for the default block stride.
    """
    _, f = _check_kv(kv, fmt)
    return quantize_v32(kv, block_stride_bytes) if f is V32 else quantize_model1(kv, block_stride_bytes)


# ---------------------------------------------------------------------------------------------- dequantisation
def _check_out_dtype(out_dtype):
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")


def _assemble(nope: torch.Tensor, scales: torch.Tensor, rope: torch.Tensor, group: int, out_dtype):
    # fp8 * scale is formed in float32 (exact for power-of-two scales, one rounding for arbitrary ones), then
    # rounded once to out_dtype.  float16 is what the SM90 sparse decode kernels compute (kernels.common.fp8):
    # the scale is rounded to f16 first, then fp8 * f16(scale) (exact in float32) is rounded once to f16.
    if out_dtype == torch.float16:
        scales = scales.to(torch.float16).float()
    x = nope.float().unflatten(-1, (-1, group)) * scales.unsqueeze(-1)
    return torch.cat([x.flatten(-2).to(out_dtype), rope.to(out_dtype)], dim=-1)


def dequantize_v32(cache: torch.Tensor, out_dtype=torch.bfloat16) -> torch.Tensor:
    """V32 cache -> ``[nb, pbs, 1, 576]`` K rows (NoPE = fp8 * float32 scale, RoPE as stored)."""
    _check_out_dtype(out_dtype)
    nope, scales, rope = unpack_v32(cache)
    return _assemble(nope, scales, rope, V32.nope_group, out_dtype)


def dequantize_model1(cache: torch.Tensor, out_dtype=torch.bfloat16) -> torch.Tensor:
    """MODEL1 cache -> ``[nb, pbs, 1, 512]`` K rows (NoPE = fp8 * 2^(e-127), RoPE as stored)."""
    _check_out_dtype(out_dtype)
    nope, exps, rope = unpack_model1(cache)
    return _assemble(nope, ue8m0_to_float32(exps), rope, MODEL1.nope_group, out_dtype)


def dequantize_kvcache(cache: torch.Tensor, fmt: "str | Fp8CacheFormat | None" = None,
                       out_dtype=torch.bfloat16) -> torch.Tensor:
    """Inverse of quantize_kvcache: FP8 cache ``[nb, pbs, 1, bytes_per_token]`` (float8_e4m3fn, int8 or uint8)
    -> ``[nb, pbs, 1, d_qk]`` in out_dtype (bfloat16, float16 or float32; float16 rounds each scale to f16
    before the product, as the SM90 sparse decode kernels do). fmt None picks it from the last dim
    (656 -> V32, 584 -> MODEL1). Exact on representable values: K rows that are fp8 * 2^k per group (e.g. the
    output of this function) quantize back to the same values; for caches from quantize_kvcache both bfloat16
    and float32 outputs are exact (fp8 * 2^k fits bf16)."""
    _, f = _check_cache(cache, fmt)
    return dequantize_v32(cache, out_dtype) if f is V32 else dequantize_model1(cache, out_dtype)
