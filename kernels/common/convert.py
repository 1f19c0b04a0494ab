"""Packed conversion of float32 pairs to bf16, and float32 fragments to 16-bit ones.

The DSL converts float32 to bf16 one element at a time (``cvt.rn.bf16.f32``, SASS
``F2F.BF16.F32``) where one ``cvt.rn.bf16x2.f32`` (``F2FP.BF16.F32.PACK_AB``) converts a pair
into the packed word a register operand or a store wants; for f16 it emits the packed form
itself.  The seesaw's P operand took 32 ``F2F`` a warpgroup a block between the softmax and the
P V issue (dense decode, sparse prefill; SASS read in session 29), FlashMLA's 16 ``F2FP``.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op


@dsl_user_op
def f32x2_to_bf16x2(lo: Float32, hi: Float32, *, loc=None, ip=None) -> Int32:
    """Two float32 rounded to nearest bf16, packed ``lo`` in the low half."""
    return Int32(llvm.inline_asm(
        T.i32(), [Float32(lo).ir_value(loc=loc, ip=ip), Float32(hi).ir_value(loc=loc, ip=ip)],
        "cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", has_side_effects=False, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT))


@cute.jit
def convert_to(src: cute.Tensor, dst: cute.Tensor):
    """dst[k] = src[k] (float32) rounded to dst's 16-bit type, element by element in the order
    both list them; bf16 a pair at a time (``f32x2_to_bf16x2``)."""
    if cutlass.const_expr(dst.element_type == cutlass.BFloat16):
        words = cute.recast_tensor(dst, Int32)
        for j in cutlass.range_constexpr(cute.size(src) // 2):
            words[j] = f32x2_to_bf16x2(src[2 * j], src[2 * j + 1])
    else:
        for k in cutlass.range_constexpr(cute.size(src)):
            dst[k] = src[k].to(dst.element_type)
