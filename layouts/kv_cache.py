"""The two FP8 KV-cache byte formats of the sparse MLA kernels, described declaratively.

This module is the single source of truth for where every byte of an FP8 paged KV cache lives. GPU kernels,
the launcher, the torch quantisation helpers (``cute_mla.quant``) and the tests all read their offsets from
here, so it must stay free of torch and cutlass imports.

Both formats are handed to the kernels as a uint8/int8/float8_e4m3fn tensor of shape
``[num_blocks, page_block_size, 1, bytes_per_token]`` whose last dim is contiguous and whose dim-1 stride is
``bytes_per_token``: one page block is then ``page_block_size * bytes_per_token`` contiguous bytes starting at
``base + block * stride(0)``. ``stride(0)`` (the *block stride*, in bytes) may exceed that (padding at the end of
each block); it must be a multiple of ``BLOCK_STRIDE_ALIGN`` so that every block starts 16-byte aligned.
All multi-byte values are little-endian (the GPU's byte order).

V32 (DeepSeek V3.2; d_qk 576 = 512 NoPE + 64 RoPE; V = the 512 NoPE dims), 656 bytes per token, each token's
record self-contained (``placement == "per_token"``); token t of a block starts at byte ``656 * t``::

    record bytes   0 .. 511   512 float8_e4m3fn NoPE codes q[0..511]
    record bytes 512 .. 527   4 float32 scales s[0..3]; s[j] covers NoPE dims 128j .. 128j+127
    record bytes 528 .. 655   64 bfloat16 RoPE values (NoPE dims 512..575 of K), not quantised
    dequantised K[d] = float(q[d]) * s[d // 128]   (d < 512);   K[512 + r] = rope[r]

  The scales are arbitrary float32 values (the reference quantiser writes powers of two, but kernels must not
  assume it).

MODEL1 (d_qk 512 = 448 NoPE + 64 RoPE; V = all 512 dims, RoPE included), 584 bytes per token on average,
laid out per page block (``placement == "per_block"``); with P = page_block_size::

    block bytes 0 .. 576P-1          P records of 576 bytes, token t at 576t:
                                       448 float8_e4m3fn NoPE codes, then 64 bfloat16 RoPE values
    block bytes 576P .. 584P-1       P records of 8 bytes, token t at 576P + 8t:
                                       7 ue8m0 scale bytes e[0..6] (e[j] covers NoPE dims 64j .. 64j+63),
                                       then 1 padding byte (written as 0, ignored on read)
    block bytes 584P .. stride(0)-1  optional padding (written as 0); the reference tooling rounds the
                                       block stride up to a multiple of 576 bytes
    ue8m0 byte e means the float 2^(e - 127) for e in 0..254; e = 255 is NaN.
    dequantised K[d] = float(q[d]) * 2^(e[d // 64] - 127)   (d < 448);   K[448 + r] = rope[r]

  Note the ``[..., 584]`` tensor shape is only a container for MODEL1: row t of a block does NOT hold token t.
  Always address MODEL1 bytes through the offsets below.

Reference quantisation (per token, per NoPE group of ``nope_group`` values): y = max(amax / 448, 1e-4),
scale = 2^ceil(log2(y)) computed exactly, code = float8_e4m3fn(x / scale) with round-to-nearest-even; V32 stores
``scale`` as float32, MODEL1 stores the exponent byte ``ceil(log2(y)) + 127``. The 1e-4 floor is applied to
``amax / 448`` as in FlashMLA's own tests/quant.py (so the smallest scale written is 2^-13).
"""

from __future__ import annotations

from dataclasses import dataclass

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn magnitude
SCALE_FLOOR = 1e-4  # lower bound on amax / FP8_E4M3_MAX before rounding the scale up to a power of two
UE8M0_BIAS = 127  # ue8m0 byte e encodes 2^(e - UE8M0_BIAS)
UE8M0_NAN = 255  # the one ue8m0 code that is not a power of two
BLOCK_STRIDE_ALIGN = 16  # bytes; keeps every block start aligned for 16-byte vector / TMA loads
BF16_BYTES = 2


@dataclass(frozen=True)
class Fp8CacheFormat:
    """Byte layout of one FP8 KV-cache format; see the module docstring for the full picture.

    All offsets are in bytes, relative to the first byte of a page block (``base + block * stride(0)``).
    """

    name: str  # "V32" or "MODEL1"
    d_qk: int  # K head dim seen by the kernels (NoPE + RoPE)
    d_nope: int  # FP8-quantised dims, first in K
    d_rope: int  # bf16 dims after the NoPE ones, stored unquantised
    d_v: int  # V = the first d_v dims of the dequantised K row
    nope_group: int  # NoPE values sharing one scale
    scale_kind: str  # "float32" (4-byte IEEE float) or "ue8m0" (1 exponent byte)
    scale_slot_bytes: int  # bytes reserved for one token's scales (incl. padding)
    bytes_per_token: int  # last dim of the cache tensor; block_bytes = page_block_size * this
    placement: str  # "per_token": one self-contained record per token; "per_block": regions per block
    default_stride_multiple: int  # the reference tooling rounds the block stride up to a multiple of this

    # ---- derived sizes ------------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return self.d_nope // self.nope_group

    @property
    def scale_bytes(self) -> int:
        return 4 if self.scale_kind == "float32" else 1

    @property
    def rope_bytes(self) -> int:
        return self.d_rope * BF16_BYTES

    @property
    def data_token_stride(self) -> int:
        """Bytes between the NoPE (and the RoPE) parts of consecutive tokens of one block."""
        if self.placement == "per_token":
            return self.bytes_per_token
        return self.d_nope + self.rope_bytes

    @property
    def scale_token_stride(self) -> int:
        """Bytes between the scales of consecutive tokens of one block."""
        return self.bytes_per_token if self.placement == "per_token" else self.scale_slot_bytes

    @property
    def v_includes_rope(self) -> bool:
        return self.d_v > self.d_nope

    # ---- block-level sizes ------------------------------------------------------------------------------
    def block_bytes(self, page_block_size: int) -> int:
        """Unpadded bytes of one page block (the smallest legal block stride)."""
        _check_page_block_size(page_block_size)
        return page_block_size * self.bytes_per_token

    def default_block_stride(self, page_block_size: int) -> int:
        """Block stride the quantiser uses when none is given: block_bytes rounded up to the stride multiple."""
        m = self.default_stride_multiple
        return -(-self.block_bytes(page_block_size) // m) * m

    def check_block_stride(self, page_block_size: int, block_stride_bytes: int) -> None:
        """Raise ValueError unless ``block_stride_bytes`` can hold a block and keeps blocks aligned."""
        need = self.block_bytes(page_block_size)
        if not isinstance(block_stride_bytes, int) or isinstance(block_stride_bytes, bool):
            raise TypeError(f"block_stride_bytes must be an int, got {type(block_stride_bytes).__name__}")
        if block_stride_bytes < need:
            raise ValueError(
                f"block_stride_bytes={block_stride_bytes} is too small for a {self.name} block of "
                f"page_block_size={page_block_size}: need at least {need} bytes")
        if block_stride_bytes % BLOCK_STRIDE_ALIGN:
            raise ValueError(
                f"block_stride_bytes={block_stride_bytes} must be a multiple of {BLOCK_STRIDE_ALIGN}")

    def scales_region_offset(self, page_block_size: int | None = None) -> int:
        """Start of the per-block scale region (per_block only; per_token formats have none)."""
        if self.placement == "per_token":
            raise ValueError(f"format {self.name} stores scales inside each token record, not in a region")
        return _need_pbs(page_block_size, self.name) * self.data_token_stride

    # ---- per-token offsets within a block -------------------------------------------------------------------
    def nope_offset(self, token: int, page_block_size: int | None = None) -> int:
        """Offset of NoPE code 0 of ``token``; code d follows at +d. ``page_block_size`` is not needed."""
        return token * self.data_token_stride

    def rope_offset(self, token: int, page_block_size: int | None = None) -> int:
        """Offset of bf16 RoPE value 0 of ``token``; value r follows at +2r."""
        if self.placement == "per_token":
            return token * self.bytes_per_token + self.d_nope + self.num_scales * self.scale_bytes
        return token * self.data_token_stride + self.d_nope

    def scale_offset(self, token: int, page_block_size: int | None = None, group: int = 0) -> int:
        """Offset of the scale of NoPE group ``group`` of ``token`` (page_block_size needed for per_block)."""
        if not 0 <= group < self.num_scales:
            raise ValueError(f"group must be in [0, {self.num_scales}), got {group}")
        if self.placement == "per_token":
            return token * self.bytes_per_token + self.d_nope + group * self.scale_bytes
        return (self.scales_region_offset(page_block_size) + token * self.scale_slot_bytes
                + group * self.scale_bytes)


def _check_page_block_size(page_block_size: int) -> None:
    if not isinstance(page_block_size, int) or page_block_size <= 0:
        raise ValueError(f"page_block_size must be a positive int, got {page_block_size!r}")


def _need_pbs(page_block_size: int | None, name: str) -> int:
    if page_block_size is None:
        raise ValueError(f"page_block_size is required for the per-block format {name}")
    _check_page_block_size(page_block_size)
    return page_block_size


V32 = Fp8CacheFormat(
    name="V32", d_qk=576, d_nope=512, d_rope=64, d_v=512, nope_group=128,
    scale_kind="float32", scale_slot_bytes=16, bytes_per_token=656, placement="per_token",
    # Per-token records are independent, so blocks need no padding; 656 = 41 * 16 keeps them aligned.
    default_stride_multiple=656,
)

MODEL1 = Fp8CacheFormat(
    name="MODEL1", d_qk=512, d_nope=448, d_rope=64, d_v=512, nope_group=64,
    scale_kind="ue8m0", scale_slot_bytes=8, bytes_per_token=584, placement="per_block",
    default_stride_multiple=576,  # what FlashMLA's reference quantiser allocates
)

FORMATS: dict[str, Fp8CacheFormat] = {"V32": V32, "MODEL1": MODEL1}

# Layout invariants the kernels rely on; cheap enough to check on every import.
for _f in FORMATS.values():
    assert _f.d_qk == _f.d_nope + _f.d_rope and _f.d_nope % _f.nope_group == 0
    assert _f.num_scales * _f.scale_bytes <= _f.scale_slot_bytes
    assert _f.bytes_per_token == _f.d_nope + _f.rope_bytes + _f.scale_slot_bytes
    assert _f.bytes_per_token % BLOCK_STRIDE_ALIGN == 0 or _f.placement == "per_block"
    assert _f.default_stride_multiple % BLOCK_STRIDE_ALIGN == 0
assert V32.rope_offset(0) == 528 and V32.scale_offset(0, group=3) == 524
assert MODEL1.rope_offset(1) == 576 + 448 and MODEL1.scale_offset(1, 64, 6) == 64 * 576 + 8 + 6


def get_format(fmt: "str | Fp8CacheFormat") -> Fp8CacheFormat:
    """Resolve a format name ("V32", "MODEL1", case-insensitive) or instance; ValueError names ``fmt``."""
    if isinstance(fmt, Fp8CacheFormat):
        return fmt
    if isinstance(fmt, str) and fmt.upper() in FORMATS:
        return FORMATS[fmt.upper()]
    raise ValueError(f"fmt must be one of {sorted(FORMATS)} or an Fp8CacheFormat, got {fmt!r}")


def format_for_dqk(d_qk: int) -> Fp8CacheFormat:
    """The FP8 format used with K head dim ``d_qk`` (576 -> V32, 512 -> MODEL1)."""
    for f in FORMATS.values():
        if f.d_qk == d_qk:
            return f
    raise ValueError(f"d_qk must be one of {[f.d_qk for f in FORMATS.values()]} for an FP8 cache, got {d_qk}")


def format_for_bytes_per_token(bytes_per_token: int) -> Fp8CacheFormat:
    """The FP8 format whose cache tensor has last dim ``bytes_per_token`` (656 -> V32, 584 -> MODEL1)."""
    for f in FORMATS.values():
        if f.bytes_per_token == bytes_per_token:
            return f
    raise ValueError(
        f"the last dim of an FP8 cache must be one of {[f.bytes_per_token for f in FORMATS.values()]} "
        f"(bytes per token), got {bytes_per_token}")
