"""Mapping from the ABI's dtype names to CuTe DSL numeric types."""
import cutlass

_DSL = {
    "bf16": cutlass.BFloat16,
    "fp16": cutlass.Float16,
    "f32": cutlass.Float32,
    "i32": cutlass.Int32,
    "u8": cutlass.Uint8,
    "fp8e4m3": cutlass.Float8E4M3FN,
}


def dsl_dtype(name: str):
    return _DSL[name]
