"""Global-memory accesses by raw byte address, for kernels that gather records whose
place is computed at run time (the FP8 caches' tokens).  Addresses are Int64 byte
addresses (``tensor.iterator.toint()`` plus offsets); shared addresses are Int32."""
from __future__ import annotations

import cutlass.cute as cute
import cutlass.cute.nvgpu.cpasync as cpasync
from cutlass import Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op


def _words(addr, space, nbytes: int) -> cute.Tensor:
    """``nbytes`` (4, 8 or 16) bytes at an ``nbytes``-aligned address in ``space``, as Int32 words."""
    return cute.make_tensor(cute.make_ptr(Int32, addr, space, assumed_align=nbytes), cute.make_layout(nbytes // 4))


@cute.jit
def load_i32(addr: Int64) -> Int32:
    return _words(addr, cute.AddressSpace.gmem, 4)[0]


@cute.jit
def load_8B(addr: Int64, dst: cute.Tensor):
    """8 bytes at an 8-byte aligned address into ``dst`` (2 Int32 registers)."""
    cute.autovec_copy(_words(addr, cute.AddressSpace.gmem, 8), dst)


@cute.jit
def load_16B(addr: Int64, dst: cute.Tensor):
    """16 bytes at a 16-byte aligned address into ``dst`` (4 Int32 registers)."""
    cute.autovec_copy(_words(addr, cute.AddressSpace.gmem, 16), dst)


@cute.jit
def load_8B_shared(addr: Int32, dst: cute.Tensor):
    """8 bytes at an 8-byte aligned shared address into ``dst`` (2 Int32 registers)."""
    cute.autovec_copy(_words(addr, cute.AddressSpace.smem, 8), dst)


@cute.jit
def load_16B_shared(addr: Int32, dst: cute.Tensor):
    """16 bytes at a 16-byte aligned shared address into ``dst`` (4 Int32 registers)."""
    cute.autovec_copy(_words(addr, cute.AddressSpace.smem, 16), dst)


@cute.jit
def store_8B_shared(src: cute.Tensor, addr: Int32):
    """2 Int32 registers to an 8-byte aligned shared address."""
    cute.autovec_copy(src, _words(addr, cute.AddressSpace.smem, 8))


@cute.jit
def store_16B_shared(src: cute.Tensor, addr: Int32):
    """4 Int32 registers to a 16-byte aligned shared address."""
    cute.autovec_copy(src, _words(addr, cute.AddressSpace.smem, 16))


@dsl_user_op
def copy_8B_async(src_addr: Int64, dst_addr: Int32, *, loc=None, ip=None) -> None:
    """8 bytes global -> shared with cp.async (through L1: cg takes 16 bytes only); wait with
    cp.async.wait_group."""
    llvm.inline_asm(None, [Int32(dst_addr).ir_value(loc=loc, ip=ip), Int64(src_addr).ir_value(loc=loc, ip=ip)],
                    "cp.async.ca.shared.global [$0], [$1], 8;", "r,l",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@cute.jit
def copy_16B_async(src_addr: Int64, dst_addr: Int32):
    """16 bytes global -> shared with cp.async (bypassing L1); wait with cp.async.wait_group."""
    atom = cute.make_copy_atom(cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL), Int32,
                               num_bits_per_copy=128)
    cute.copy(atom, _words(src_addr, cute.AddressSpace.gmem, 16), _words(dst_addr, cute.AddressSpace.smem, 16))


@dsl_user_op
def prefetch_l2(addr: Int64, *, loc=None, ip=None) -> None:
    """Bring the line holding ``addr`` into L2; nothing waits for it."""
    llvm.inline_asm(None, [Int64(addr).ir_value(loc=loc, ip=ip)], "prefetch.global.L2 [$0];", "l",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def copy_16B_async_zfill(dst_addr: Int32, src_addr: Int64, src_bytes: Int32, *, loc=None, ip=None) -> None:
    """16 bytes global -> shared with cp.async (bypassing L1), of which only the first
    ``src_bytes`` (16 or 0) are read: 0 writes zeros without touching ``src_addr``.
    The L2::256B hint pulls the rest of the 256-byte sector group into L2, which the
    other lanes of a gathered row read next."""
    llvm.inline_asm(None, [Int32(dst_addr).ir_value(loc=loc, ip=ip), Int64(src_addr).ir_value(loc=loc, ip=ip),
                           Int32(src_bytes).ir_value(loc=loc, ip=ip)],
                    "cp.async.cg.shared.global.L2::256B [$0], [$1], 16, $2;", "r,l,r",
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)
