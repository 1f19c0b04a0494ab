"""FP8 (e4m3) KV-cache dequantisation on the CUDA cores.

The sparse decode kernels turn 4 float8_e4m3fn codes (one 32-bit word) and their
group's scale into 4 float16 values (two 32-bit words, memory order kept), the type
their matmuls run in: each pair of codes goes fp8 -> f16 in one instruction (exact:
every e4m3 value is an f16 normal) and is multiplied by the scale, rounded to f16, in
one more (``mul.rn.f16x2``, one rounding).  That is 4 instructions per 4 codes where a
bf16 result needs 12 (f16 -> f32 -> times the f32 scale -> pack to bf16), and the
producer warps' conversion sits on the sparse decode kernel's critical path.

So the dequantised value is f16(code * f16(scale)): an arbitrary float32 scale keeps
11 significant bits (a power of two is exact), the product is rounded once, and
f16's subnormals are kept (no flush to zero).  Values must stay inside f16's range
(|x| < 65520): a scale above 2^15 or a value past it gives inf.  Against the exact
product the error is under 2^-10 relative, less than the 2^-9 of a bf16 result.

``bf16x2_to_f16x2`` moves the bf16 operands (RoPE, Q) to the same type.

``dequant_e4m3x4_bf16`` is the bf16 alternative (the kernels' ``matmul="bf16"`` flag):
code -> f16 -> f32 (both exact), times the whole float32 scale in f32, rounded to
bf16: bf16's range and, within a rounding, FlashMLA's numerics (which round the scale
to bf16 first); 12 instructions per 4 codes.
"""
from __future__ import annotations

from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

_E4M3X4_TO_F16X4 = """{
  .reg .b16 lo, hi;
  .reg .b32 h0, h1;
  mov.b32 {lo, hi}, $2;
  cvt.rn.f16x2.e4m3x2 h0, lo;
  cvt.rn.f16x2.e4m3x2 h1, hi;
  mul.rn.f16x2 $0, h0, $3;
  mul.rn.f16x2 $1, h1, $3;
}"""


def _two_words(asm: str, operands, constraints: str, loc, ip):
    """Run ``asm`` (outputs $0, $1: two 32-bit words) on the MLIR ``operands``; returns both
    words.  ``constraints`` lists the inputs' register kinds after the two "=r"."""
    res = llvm.inline_asm(
        llvm.StructType.get_literal([T.i32(), T.i32()]), operands, asm, "=r,=r," + constraints,
        has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)
    return (Int32(llvm.extractvalue(T.i32(), res, [0], loc=loc, ip=ip)),
            Int32(llvm.extractvalue(T.i32(), res, [1], loc=loc, ip=ip)))


@dsl_user_op
def dequant_e4m3x4(word: Int32, scale2: Int32, *, loc=None, ip=None):
    """4 e4m3 codes (byte i of ``word`` = code i) times a scale (``scale2``: the f16 scale
    in both halves, ``f16x2_scale``) -> (f16 of codes 0, 1; f16 of codes 2, 3), each pair
    packed low half first."""
    return _two_words(_E4M3X4_TO_F16X4, [Int32(word).ir_value(loc=loc, ip=ip), Int32(scale2).ir_value(loc=loc, ip=ip)],
                      "r,r", loc, ip)


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
def dequant_e4m3x4_bf16(word: Int32, scale: Float32, *, loc=None, ip=None):
    """4 e4m3 codes (byte i of ``word`` = code i) times a float32 ``scale`` -> (bf16 of codes
    0, 1; bf16 of codes 2, 3), each pair packed low half first."""
    return _two_words(_E4M3X4_TO_BF16X4,
                      [Int32(word).ir_value(loc=loc, ip=ip), Float32(scale).ir_value(loc=loc, ip=ip)], "r,f", loc, ip)


@dsl_user_op
def f16x2_scale(scale: Float32, *, loc=None, ip=None) -> Int32:
    """A float32 scale rounded to f16 (round to nearest, subnormals kept), in both halves."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(scale).ir_value(loc=loc, ip=ip)],
        """{
  .reg .b16 h;
  cvt.rn.f16.f32 h, $1;
  mov.b32 $0, {h, h};
}""", "=r,f", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


@dsl_user_op
def bf16x2_to_f16x2(word: Int32, *, loc=None, ip=None) -> Int32:
    """Two bf16 (low half first) -> two f16, each rounded to nearest (exact inside f16's
    normal range; bf16 -> f32 is a shift)."""
    return Int32(llvm.inline_asm(
        T.i32(), [Int32(word).ir_value(loc=loc, ip=ip)],
        """{
  .reg .b32 lo, hi;
  shl.b32 lo, $1, 16;
  and.b32 hi, $1, 0xffff0000;
  cvt.rn.f16x2.f32 $0, hi, lo;
}""", "=r,r", has_side_effects=False, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT))


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
