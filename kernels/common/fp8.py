"""FP8 (e4m3) KV-cache dequantisation on the CUDA cores.

The sparse decode kernels turn 4 float8_e4m3fn codes (one 32-bit word) and their
group's float32 scale into 4 bfloat16 values (two 32-bit words, memory order kept).
Each code goes fp8 -> f16 (exact, ``cvt.rn.f16x2.e4m3x2`` converts two at once)
-> f32 (exact) -> times the scale in f32 (one rounding; exact for power-of-two
scales) -> bf16 (one more rounding), so any scale value is honoured, not just powers
of two, and nothing is flushed to zero.
"""
from __future__ import annotations

from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

_E4M3X4_TO_BF16X4 = """{
  .reg .b16 lo, hi, a0, a1, a2, a3;
  .reg .b32 h0, h1;
  .reg .f32 f0, f1, f2, f3;
  mov.b32 {lo, hi}, $2;
  cvt.rn.f16x2.e4m3x2 h0, lo;
  cvt.rn.f16x2.e4m3x2 h1, hi;
  mov.b32 {a0, a1}, h0;
  mov.b32 {a2, a3}, h1;
  cvt.f32.f16 f0, a0;
  cvt.f32.f16 f1, a1;
  cvt.f32.f16 f2, a2;
  cvt.f32.f16 f3, a3;
  mul.rn.f32 f0, f0, $3;
  mul.rn.f32 f1, f1, $3;
  mul.rn.f32 f2, f2, $3;
  mul.rn.f32 f3, f3, $3;
  cvt.rn.bf16x2.f32 $0, f1, f0;
  cvt.rn.bf16x2.f32 $1, f3, f2;
}"""


@dsl_user_op
def dequant_e4m3x4(word: Int32, scale: Float32, *, loc=None, ip=None):
    """4 e4m3 codes (byte i of ``word`` = code i) times ``scale`` -> (bf16 of codes 0, 1;
    bf16 of codes 2, 3), each pair packed low half first."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32(), T.i32()]),
        [Int32(word).ir_value(loc=loc, ip=ip), Float32(scale).ir_value(loc=loc, ip=ip)],
        _E4M3X4_TO_BF16X4, "=r,=r,r,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT)
    return (Int32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip)),
            Int32(llvm.extractvalue(T.i32(), res, [1], loc=loc, ip=ip)))


@dsl_user_op
def ue8m0_to_f32(e: Int32, *, loc=None, ip=None) -> Float32:
    """ue8m0 exponent byte -> 2^(e - 127) as a float32 (e = 0 is the subnormal 2^-127,
    255 is NaN), by building the bits: no exp2 approximation, no flush to zero."""
    bits = llvm.inline_asm(
        T.i32(), [Int32(e).ir_value(loc=loc, ip=ip)],
        """{
  .reg .pred z, n;
  .reg .b32 b;
  shl.b32 b, $1, 23;
  setp.eq.u32 z, $1, 0;
  setp.eq.u32 n, $1, 255;
  selp.b32 b, 0x00400000, b, z;
  selp.b32 $0, 0x7fc00000, b, n;
}""", "=r,r", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)
    return Float32(llvm.bitcast(T.f32(), bits, loc=loc, ip=ip))


@dsl_user_op
def f32_from_bits(bits: Int32, *, loc=None, ip=None) -> Float32:
    """The float32 whose bit pattern is ``bits`` (a scale loaded as a raw word)."""
    return Float32(llvm.bitcast(T.f32(), Int32(bits).ir_value(loc=loc, ip=ip), loc=loc, ip=ip))
