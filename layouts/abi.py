"""Declarative kernel parameter ABI, shared by the compile step and the launcher.

A compiled CuTe DSL kernel takes each ``cute.Tensor`` argument as one by-value
struct: the 64-bit data pointer, then every *dynamic* extent as int32 (in mode
order), then every *dynamic* stride as int64 (in mode order), each naturally
aligned, the struct aligned to 8 bytes.  Static extents and strides are folded
into the code and are absent from the struct.  Scalars are passed as themselves.

One ``ArgSpec`` tuple per kernel describes those parameters, in the order of the
kernel's ``@cute.jit __call__`` arguments, which must also be the order of the
``@cute.kernel`` parameters (static objects such as tiled MMAs and smem layouts
become no parameter; keep them last).  The compile step
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
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

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

    def params(self) -> list["Param"]:
        return [Param(self.name, *self.layout(), self.fields())]

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

    def params(self) -> list["Param"]:
        return [Param(self.name, *self.layout(), self.fields())]

    def values(self, v: Any) -> list:
        if self.dtype == "f32":
            return [float(v)]
        v = int(v)
        lim = 2**31 if self.dtype == "i32" else 2**63
        if not -lim <= v < lim:
            raise AbiError(f"{self.name}: {v} does not fit {self.dtype}")
        return [v]


@dataclass(frozen=True)
class TmaArg:
    """A tensor the kernel reads (or writes) through one TMA descriptor.

    The host-side argument is the whole tensor (``tensor`` says which extents and
    strides are compiled in); the kernel receives two parameters: the 128-byte
    ``CUtensorMap`` (by value, 64-byte aligned) and the TMA coordinate tensor's
    dynamic extents (one int32 per dynamic extent of ``tensor``).
    ``dims`` lists, innermost first, which tensor mode feeds each TMA dimension
    (the atom's ``tma_gbasis``), ``box`` the box extent of each TMA dimension,
    ``swizzle`` the shared-memory swizzle in bytes (0, 32, 64, 128).
    """

    tensor: TensorArg
    dims: tuple[int, ...]
    box: tuple[int, ...]
    swizzle: int = 128
    oob_nan: bool = False  # fill out-of-bounds elements with NaN instead of zero
    # The kernel's view of the tensor as a permutation of its modes, when it reorders
    # them before building the atom: the coordinate extents follow the view's order.
    view: tuple[int, ...] | None = None

    def __post_init__(self):
        if sorted(self.dims) != list(range(len(self.tensor.shape))) or len(self.box) != len(self.dims):
            raise ValueError(f"{self.name}: dims must be a permutation of the tensor's modes, one box extent each")
        if self.tensor.stride[self.dims[0]] != 1:
            raise ValueError(f"{self.name}: the innermost TMA dimension must have a static stride of 1")
        if self.swizzle not in (0, 32, 64, 128):
            raise ValueError(f"{self.name}: swizzle must be 0, 32, 64 or 128 bytes")
        if self.view is not None and sorted(self.view) != list(range(len(self.tensor.shape))):
            raise ValueError(f"{self.name}: view must be a permutation of the tensor's modes")

    @property
    def coord_modes(self) -> list[int]:
        """Tensor modes whose extents the kernel takes as coordinate extents, in its order."""
        order = self.view if self.view is not None else range(len(self.tensor.shape))
        return [m for m in order if isinstance(self.tensor.shape[m], str)]

    @property
    def name(self) -> str:
        return self.tensor.name

    def params(self) -> list["Param"]:
        coords = [(f"{self.name}.coord[{i}]", "i") for i in self.coord_modes]
        out = [Param(f"{self.name}.tma", 128, 64, [(f"{self.name}.tma", "128s")])]
        if coords:
            out.append(Param(f"{self.name}.coords", *_struct_layout([c for _, c in coords]), coords))
        return out

    def values(self, t: Any) -> list[int]:
        """Check ``t`` as a plain tensor argument; return the coordinate extents (the map is
        encoded by the launcher, which owns the driver)."""
        self.tensor.values(t)
        return [t.shape[i] for i in self.coord_modes]


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its size, alignment and struct fields (name, struct code)."""

    name: str
    size: int
    align: int
    fields: list


ArgSpec = Union[TensorArg, ScalarArg, TmaArg]


def _struct_layout(codes: Sequence[str], align: int = 1) -> tuple[int, int]:
    """(size, alignment) of a C struct of the given struct-module codes."""
    off, al = 0, align
    for c in codes:
        sz = struct.calcsize(c)
        off = -(-off // sz) * sz
        off += sz
        al = max(al, sz)
    return -(-off // al) * al, al


def _field_offsets(fields: Sequence[tuple[str, str]]) -> list[int]:
    """Offsets of a C struct's fields (each naturally aligned, at most to 8 bytes)."""
    out, off = [], 0
    for _, code in fields:
        sz = struct.calcsize(code)
        off = -(-off // min(sz, 8)) * min(sz, 8)
        out.append(off)
        off += sz
    return out


def param_layout(args: Sequence[ArgSpec]) -> list[dict]:
    """The expected kernel parameter list (an argument may be several parameters)."""
    return [{"name": p.name, "size": p.size, "align": p.align} for a in args for p in a.params()]


class ParamLayout:
    """Where every field of one kernel's parameters lives in one host buffer, worked out once.

    Each parameter sits at its own alignment; ``offsets`` are the parameter offsets the driver's
    ``kernelParams`` array points at.  ``pack`` binds runtime values *by name* (every ABI name
    exactly once, so two neighbours of the same shape can never be swapped), checks each one
    against its spec and writes it.  ``pointer_words`` says where each plain tensor's data
    pointer lives (as an index into the buffer viewed as uint64), ``tma_offsets`` where each TMA
    argument's 128-byte map lives: what a prepared launch rewrites when only pointers change.
    """

    def __init__(self, args: Sequence[ArgSpec]):
        self.args = tuple(args)
        self.names = tuple(a.name for a in self.args)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"argument names must be unique, got {self.names}")
        self.offsets: list[int] = []
        self._writers: list[tuple[ArgSpec, list[tuple[int, str]]]] = []
        self.pointer_words: dict[str, int] = {}
        self.tma_offsets: dict[str, int] = {}
        off = 0
        for a in self.args:
            slots = []
            for p in a.params():
                off = -(-off // p.align) * p.align
                self.offsets.append(off)
                slots += [(off + f, code) for f, (_, code) in zip(_field_offsets(p.fields), p.fields)]
                off += p.size
            if isinstance(a, TmaArg):
                self.tma_offsets[a.name] = slots[0][0]
                slots = slots[1:]  # the map itself is written by the launcher
            elif isinstance(a, TensorArg):
                self.pointer_words[a.name] = slots[0][0] // 8
            self._writers.append((a, slots))
        self.size = -(-max(off, 8) // 8) * 8  # whole words: pointers are rewritten as uint64

    def check_names(self, values: Mapping[str, Any]) -> None:
        if len(values) != len(self.names) or any(n not in values for n in self.names):
            missing = [n for n in self.names if n not in values]
            unknown = [n for n in values if n not in self.names]
            raise AbiError(f"kernel arguments must be exactly {', '.join(self.names)}; "
                           f"missing {missing or 'none'}, unknown {unknown or 'none'}")

    def pack(self, values: Mapping[str, Any]) -> bytearray:
        """A buffer holding ``values`` (name -> tensor or number), every one checked; the TMA maps
        are left zero for the launcher to fill."""
        self.check_names(values)
        buf = bytearray(self.size)
        for spec, slots in self._writers:
            for (off, code), x in zip(slots, spec.values(values[spec.name])):
                struct.pack_into("<" + code, buf, off, x)
        return buf
