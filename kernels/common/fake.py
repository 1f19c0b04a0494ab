"""Fake (shape-only) kernel arguments for ahead-of-time compilation from an ABI spec."""
from __future__ import annotations

import cutlass
import cutlass.cute as cute

from cute_mla.layouts.abi import ScalarArg, TensorArg, TmaArg
from cute_mla.kernels.common.dtypes import dsl_dtype

_SCALARS = {"i32": cutlass.Int32, "i64": cutlass.Int64, "f32": cutlass.Float32}


def fake_arg(spec):
    """A fake tensor or scalar that specialises the kernel exactly as ``spec`` says:
    named extents are 32-bit dynamic values, named strides 64-bit ones, each with the
    divisibility the spec promises; int entries are compiled in."""
    if isinstance(spec, ScalarArg):
        return _SCALARS[spec.dtype](0)
    if isinstance(spec, TmaArg):  # the kernel's __call__ builds the TMA atom from the tensor
        spec = spec.tensor
    assert isinstance(spec, TensorArg), spec
    div = dict(spec.divisibility)
    shape = tuple(d if isinstance(d, int) else cute.sym_int(32, divisibility=div.get(d, 1)) for d in spec.shape)
    stride = tuple(d if isinstance(d, int) else cute.sym_int(64, divisibility=div.get(d, 1)) for d in spec.stride)
    return cute.runtime.make_fake_tensor(dsl_dtype(spec.dtype), shape, stride, assumed_align=spec.align)


def fake_args(specs):
    return [fake_arg(s) for s in specs]
