"""Declarative kernel parameter ABI, shared by the compile step and the launcher.

A compiled CuTe DSL kernel takes each ``cute.Tensor`` argument as one by-value
struct: the 64-bit data pointer, then every *dynamic* extent as int32 (in mode
order), then every *dynamic* stride as int64 (in mode order), each naturally
aligned, the struct aligned to 8 bytes.  Static extents and strides are folded
into the code and are absent from the struct.  Scalars are passed as themselves.

One ``ArgSpec`` tuple per kernel describes those parameters.  The compile step
turns it into fake tensors (so the kernel is specialised exactly as described)
and records the sizes the PTX actually declares; the launcher packs runtime
values by the same description and refuses a tensor that does not fit it
(wrong dtype, rank, a static extent/stride that differs, a stride that breaks a
promised divisibility, a misaligned pointer).  A test checks that the packed
sizes agree with the PTX of every compiled variant.

This module is runtime code: it imports neither the DSL nor torch at load time.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

Dim = Union[int, str]  # an int is static (compiled in); a str names a dynamic value

# dtype name -> (torch dtype attribute, element bytes)
DTYPES = {
    "bf16": ("bfloat16", 2),
    "fp16": ("float16", 2),
    "f32": ("float32", 4),
    "i32": ("int32", 4),
    "u8": ("uint8", 1),
    "fp8e4m3": ("float8_e4m3fn", 1),
}


class AbiError(ValueError):
    """A runtime argument does not fit the kernel's compiled ABI."""


@dataclass(frozen=True)
class TensorArg:
    """A global-memory tensor parameter.

    ``shape``/``stride`` entries are ints (static) or names (dynamic).  ``divisibility``
    maps a dynamic name to the factor the compiler may assume it divides by (so it can
    emit wide vector accesses); the launcher checks it.  ``align`` is the byte
    alignment promised for the data pointer.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    stride: tuple[Dim, ...]
    align: int = 16
    divisibility: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype!r}")
        if len(self.shape) != len(self.stride):
            raise ValueError(f"{self.name}: shape and stride ranks differ")

    @property
    def dynamic_shape(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if isinstance(d, str)]

    @property
    def dynamic_stride(self) -> list[int]:
        return [i for i, d in enumerate(self.stride) if isinstance(d, str)]

    def fields(self) -> list[tuple[str, str]]:
        """(field name, struct code) of the by-value struct, in order."""
        out = [(f"{self.name}.ptr", "Q")]
        out += [(f"{self.name}.shape[{i}]", "i") for i in self.dynamic_shape]
        out += [(f"{self.name}.stride[{i}]", "q") for i in self.dynamic_stride]
        return out

    def layout(self) -> tuple[int, int]:
        return _struct_layout([code for _, code in self.fields()], align=8)

    def values(self, t: Any) -> list[int]:
        """Check a torch tensor against the spec and return the struct's values."""
        import torch

        want = getattr(torch, DTYPES[self.dtype][0])
        if t.dtype != want and not (self.dtype == "u8" and t.element_size() == 1):
            raise AbiError(f"{self.name}: expected dtype {want}, got {t.dtype}")
        if t.dim() != len(self.shape):
            raise AbiError(f"{self.name}: expected rank {len(self.shape)}, got shape {tuple(t.shape)}")
        if not t.is_cuda:
            raise AbiError(f"{self.name}: expected a CUDA tensor, got device {t.device}")
        div = dict(self.divisibility)
        for kind, spec, actual in (("extent", self.shape, t.shape), ("stride", self.stride, t.stride())):
            for i, (s, a) in enumerate(zip(spec, actual)):
                if isinstance(s, int):
                    # A size-1 mode's stride never matters, so any value is accepted there.
                    if a != s and not (kind == "stride" and t.shape[i] == 1):
                        raise AbiError(f"{self.name}: {kind} {i} must be {s}, got {a} (shape {tuple(t.shape)}, stride {t.stride()})")
                elif s in div and a % div[s] != 0:
                    raise AbiError(f"{self.name}: {kind} {i} ({s}) = {a} must be a multiple of {div[s]}")
        if t.numel() and t.data_ptr() % self.align:
            raise AbiError(f"{self.name}: data pointer must be {self.align}-byte aligned")
        shape, stride = t.shape, t.stride()
        return [t.data_ptr()] + [shape[i] for i in self.dynamic_shape] + [stride[i] for i in self.dynamic_stride]


@dataclass(frozen=True)
class ScalarArg:
    """A by-value scalar parameter: ``dtype`` is "i32", "i64" or "f32"."""

    name: str
    dtype: str = "i32"

    def fields(self) -> list[tuple[str, str]]:
        return [(self.name, {"i32": "i", "i64": "q", "f32": "f"}[self.dtype])]

    def layout(self) -> tuple[int, int]:
        code = self.fields()[0][1]
        return struct.calcsize(code), struct.calcsize(code)

    def values(self, v: Any) -> list:
        if self.dtype == "f32":
            return [float(v)]
        v = int(v)
        lim = 2**31 if self.dtype == "i32" else 2**63
        if not -lim <= v < lim:
            raise AbiError(f"{self.name}: {v} does not fit {self.dtype}")
        return [v]


ArgSpec = Union[TensorArg, ScalarArg]


def _struct_layout(codes: Sequence[str], align: int = 1) -> tuple[int, int]:
    """(size, alignment) of a C struct of the given struct-module codes."""
    off, al = 0, align
    for c in codes:
        sz = struct.calcsize(c)
        off = -(-off // sz) * sz
        off += sz
        al = max(al, sz)
    return -(-off // al) * al, al


def param_layout(args: Sequence[ArgSpec]) -> list[dict]:
    """The expected kernel parameter list: one entry per argument with size and alignment."""
    return [{"name": a.name, "size": a.layout()[0], "align": a.layout()[1]} for a in args]


@dataclass
class PackedParams:
    """Kernel parameters packed into one buffer plus per-parameter offsets (kernelParams)."""

    buffer: bytearray = field(default_factory=bytearray)
    offsets: list[int] = field(default_factory=list)


def pack(args: Sequence[ArgSpec], values: Sequence[Any]) -> PackedParams:
    """Pack runtime values (torch tensors / numbers) by the ABI, one entry per parameter."""
    if len(args) != len(values):
        raise AbiError(f"expected {len(args)} kernel arguments, got {len(values)}")
    out = PackedParams()
    for spec, v in zip(args, values):
        size, al = spec.layout()
        base = -(-len(out.buffer) // max(al, 8)) * max(al, 8)
        out.buffer.extend(b"\0" * (base - len(out.buffer)))
        off = 0
        blob = bytearray(size)
        for (fname, code), x in zip(spec.fields(), spec.values(v)):
            sz = struct.calcsize(code)
            off = -(-off // sz) * sz
            struct.pack_into("<" + code, blob, off, x)
            off += sz
        out.offsets.append(base)
        out.buffer.extend(blob)
    return out
