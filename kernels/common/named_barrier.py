"""Named barriers between warpgroups that run different code.

``bar.sync`` / ``bar.arrive`` (what ``cute.arch.barrier`` and the default
``cute.arch.barrier_arrive`` emit) are the ``.aligned`` forms: PTX requires every
participating thread to execute the same barrier instruction.  The SM90 kernels' warpgroups
meet at named barriers from different instructions: the seesaw's two consumer warpgroups are
compiled as separate code paths (``even_step`` / ``odd_step``, each with its own copy of the
per-tile code), and one side of an arrive/sync pair is never the other's instruction.  So
every named barrier between warpgroups goes through these non-aligned ``barrier.sync`` /
``barrier.cta.arrive``.  compute-sanitizer's synccheck reports the aligned forms as divergent
threads where two warpgroups sync from different instructions.  On an H100 the two forms
measured the same within run-to-run noise on every benchmarked kernel (session 6).
"""
from __future__ import annotations

import cutlass.cute as cute
from cutlass import Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op


@dsl_user_op
def sync(barrier_id, threads, *, loc=None, ip=None) -> None:
    """Wait at named barrier ``barrier_id`` until ``threads`` threads have arrived (this
    one included); may be reached from different instructions by different warps."""
    llvm.inline_asm(None, [Int32(barrier_id).ir_value(loc=loc, ip=ip), Int32(threads).ir_value(loc=loc, ip=ip)],
                    "barrier.sync $0, $1;", "r,r", has_side_effects=True, is_align_stack=False,
                    asm_dialect=llvm.AsmDialect.AD_ATT)


def arrive(barrier_id, threads) -> None:
    """Arrive at named barrier ``barrier_id`` (of ``threads`` threads) without waiting."""
    cute.arch.barrier_arrive(barrier_id=barrier_id, number_of_threads=threads, aligned=False)
