"""The Q copy maps (``q_share``) against the layout the MMAs read, on the CPU.

A consumer thread's ``QShare`` says which 16-byte chunks of a Q tile it copies: from which byte of its
global row to which shared address.  Evaluated here for every thread with plain integers (the map's
Python body, ``__wrapped__``, with the 128-byte swizzle's Python body beside it), and held to:
  - every chunk of every row copied exactly once, and no chunk past the row's end;
  - each shared address the K-major 128B-swizzled operand's own byte address of the chunk's first
    element: 64-column tiles of all R rows (R * 128 bytes each), a row's 64 columns one 128-byte line,
    bits 4-6 (the 16-byte piece) XOR bits 7-9 (the line in its 1024-byte atom);
  - a chunk rounded to f16 exactly where all its columns lie below ``tail_start``.
The maps' instructions are checked in SASS by test_compile and their results by the GPU tests.
"""
from __future__ import annotations

import pytest

pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl (the build extra) is not installed")

from cute_mla.kernels.common import mma_sm90  # noqa: E402
from cute_mla import registry  # noqa: E402
from cute_mla.kernels.sm90 import heads_consumer, mla_consumers  # noqa: E402
from cute_mla.kernels.sm90.dense_decode import DenseDecodeSm90  # noqa: E402
from cute_mla.kernels.sm90.dense_decode_heads import DenseDecodeHeadsSm90  # noqa: E402
from cute_mla.kernels.sm90.sparse_decode import SparseDecodeSm90  # noqa: E402
from cute_mla.kernels.sm90.sparse_decode_heads import SparseDecodeHeadsSm90  # noqa: E402
from cute_mla.kernels.sm90.sparse_prefill import SparsePrefillSm90  # noqa: E402


class _Base:
    """A stand-in for a shared-memory tensor at address 0."""

    class iterator:  # noqa: N801 (the attribute the maps read)
        @staticmethod
        def toint():
            return 0


def _value(x) -> int:
    return x if isinstance(x, int) else x.value


def operand_address(row: int, byte: int, rows: int) -> int:
    """Byte address of (row, byte offset in the row) in a K-major 128B-swizzled operand of ``rows`` rows."""
    offset = (byte // 128) * rows * 128 + row * 128 + byte % 128
    return offset ^ ((offset >> 3) & 0x70)


def chunks_of(kernel, threads: int) -> dict:
    """(row, byte offset in the row) -> [(shared address, rounded)] over every thread's share."""
    seen: dict = {}
    for ctid in range(threads):
        share = type(kernel).q_share.__wrapped__(kernel, _Base, ctid)
        for c in share.chunks:
            if getattr(c, "exists", True) is False:
                continue  # past its row (the last step of a map whose steps overrun a row)
            key = (_value(share.row), _value(share.src_off) + c.src)
            seen.setdefault(key, []).append((_value(c.dst), c.rounded))
    return seen


def check_map(kernel, rows: int, threads: int):
    row_bytes = kernel.d * 2
    seen = chunks_of(kernel, threads)
    assert sorted(seen) == [(r, b) for r in range(rows) for b in range(0, row_bytes, 16)]
    for (row, byte), copies in seen.items():
        assert len(copies) == 1, f"row {row} byte {byte} copied {len(copies)} times"
        dst, rounded = copies[0]
        assert dst == operand_address(row, byte, rows), (row, byte, dst)
        assert rounded == ((byte + 16) // 2 <= kernel.tail_start), (row, byte)


@pytest.fixture(autouse=True)
def python_swizzle(monkeypatch):
    """The maps call the jitted swizzle; here its Python body, on integers."""
    plain = mma_sm90.swizzle_128b.__wrapped__
    monkeypatch.setattr(mla_consumers, "swizzle_128b", plain)
    monkeypatch.setattr(heads_consumer, "swizzle_128b", plain)


@pytest.mark.parametrize("make", [lambda: SparseDecodeSm90("V32", "f16"), lambda: SparseDecodeSm90("V32", "bf16"),
                                  lambda: SparseDecodeSm90("MODEL1", "bf16"), lambda: DenseDecodeSm90("bf16"),
                                  lambda: SparsePrefillSm90(576), lambda: SparsePrefillSm90(512)],
                         ids=["sparse-V32-f16", "sparse-V32-bf16", "sparse-MODEL1", "dense", "prefill-576",
                              "prefill-512"])
def test_64_row_map_covers_the_tile_once_at_the_operand_addresses(make):
    kernel = make()
    check_map(kernel, 64, kernel.consumer_threads)


@pytest.mark.parametrize("fmt", ["V32", "MODEL1"])
@pytest.mark.parametrize("matmul", ["f16", "bf16"])
@pytest.mark.parametrize("heads", [8, 16])
def test_qt_map_covers_the_tile_once_at_the_operand_addresses(fmt, matmul, heads):
    """The small-head kernel's Q^T tile: N rows (one a head), 128 / N threads a row, whose last step
    runs past the row (V32: 72 pieces a row, 8 or 16 threads) and copies nothing there."""
    kernel = SparseDecodeHeadsSm90(fmt, matmul, heads)
    check_map(kernel, heads, kernel.consumer_threads)


DENSE_HEADS_SHAPES = [(v["heads"], v["tokens"]) for v in registry.get("dense_decode_heads_sm90").variants
                      if v["dtype"] == "bf16"]


@pytest.mark.parametrize("heads,tokens", DENSE_HEADS_SHAPES)
def test_dense_qt_map_covers_the_tile_once_at_the_operand_addresses(heads, tokens):
    """The dense small-head kernel's Q^T tile (72 pieces a row, a row per column: tokens x
    heads): at 32 columns four threads a row, their steps alternating between the halves of a
    128-byte line."""
    kernel = DenseDecodeHeadsSm90("bf16", heads, tokens)
    check_map(kernel, heads * tokens, kernel.consumer_threads)


def test_rounding_follows_tail_start():
    """V32 in f16 matmuls: a bf16 Q is rounded to f16 in its 512 NoPE columns, its RoPE columns
    [512, 576) stay bf16 (bytes 1024-1151)."""
    seen = chunks_of(SparseDecodeSm90("V32", "f16"), 256)
    assert {b for (_, b), c in seen.items() if not c[0][1]} == set(range(1024, 1152, 16))
