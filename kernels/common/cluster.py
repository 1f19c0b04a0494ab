"""What two CTAs of a cluster share: one TMA load into both, a value handed to the peer.

The DSL's multicast TMA copy (``CopyBulkTensorTileG2SMulticastOp``) turns its destination
into a cluster address with ``cvta.to.shared::cluster``.  In a warp that also issues WGMMA,
ptxas then serialises every WGMMA of the kernel (C7520, silently: dense decode compiled with it
had a wait after each of its 88 HGMMA, against 6 waits without it; 2026-12-05, DSL 4.8.1).
Here the instruction is written out with the executing CTA's 32-bit shared addresses, which
PTX accepts as shared::cluster addresses of that same CTA, so no conversion is emitted and the
WGMMAs stay pipelined (6 waits).
"""
from __future__ import annotations

import cutlass._mlir.dialects.cute as _cute_ir
import cutlass._mlir.dialects.cute_nvgpu as _cute_nvgpu_ir
from cutlass import Int16, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op


def _asm(operands, text: str, constraints: str, loc, ip) -> None:
    llvm.inline_asm(None, [x.ir_value(loc=loc, ip=ip) for x in operands], text, constraints,
                    has_side_effects=True, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)


@dsl_user_op
def tma_desc_address(atom, *, loc=None, ip=None) -> Int64:
    """The generic address of a TMA copy atom's descriptor (a kernel parameter)."""
    ptr_ty = _cute_ir.PtrType.get(Int64.mlir_type, _cute_ir.AddressSpace.generic, 64)
    exec_atom = _cute_nvgpu_ir.atom_make_exec_tma(atom._trait.value, loc=loc, ip=ip)
    return _cute_nvgpu_ir.get_tma_desc_addr(ptr_ty, exec_atom, loc=loc, ip=ip).toint(loc=loc, ip=ip)


@dsl_user_op
def tma_load_4d_multicast(dst: Int32, desc: Int64, coords, mbar: Int32, cta_mask: int, *, loc=None,
                          ip=None) -> None:
    """One thread: the 4-D TMA box at ``coords`` (innermost first) into shared offset ``dst`` of
    every CTA of the cluster in ``cta_mask``, each CTA's bytes completing on its own mbarrier
    at offset ``mbar``.  ``dst`` and ``mbar`` are this CTA's shared addresses: every CTA of the
    cluster allocates shared memory the same way, so they are the same offsets there."""
    c0, c1, c2, c3 = (Int32(c) for c in coords)
    _asm([Int32(dst), Int64(desc), c0, c1, c2, c3, Int32(mbar), Int16(cta_mask)],
         "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
         " [$0], [$1, {$2, $3, $4, $5}], [$6], $7;", "r,l,r,r,r,r,r,h", loc, ip)


@dsl_user_op
def store_to_peer(addr: Int32, peer: Int32, value: Int32, *, loc=None, ip=None) -> None:
    """Store ``value`` at this CTA's shared offset ``addr`` in cluster CTA ``peer``'s shared
    memory (``mapa`` then ``st.shared::cluster``); a cluster barrier orders it before the
    peer's reads."""
    _asm([Int32(addr), Int32(peer), Int32(value)],
         "{\n\t.reg .b32 remote;\n\tmapa.shared::cluster.u32 remote, $0, $1;\n"
         "\tst.shared::cluster.u32 [remote], $2;\n\t}", "r,r,r", loc, ip)
