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

import enum

import cutlass.cute as cute
from cutlass import Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op


class NamedBarrier(enum.IntEnum):
    """Every named barrier id of the SM90 MLA kernels' consumer warpgroups (0 is
    ``__syncthreads``): 256 threads, the two consumer warpgroups, unless a comment says 128."""

    Q_RELOAD = 1  # nobody still reads the previous piece's Q / the new Q is in shared memory
    ROW_MAX = 4  # the consumers' row maxima of a block are exchanged (``block_softmax``)
    P_READY = 5  # both halves of a block's P are in shared memory (small-head sparse decode: its one
    # warpgroup's P^T, 128 threads)
    ROW_SUM = 6  # the consumers' row sums are exchanged (``finish_rows``)
    # the seesaw (``kernels.sm90.seesaw``)
    MAX_0 = 7  # warpgroup 0 published its row maxima after S of the even block
    MAX_1 = 8  # warpgroup 1 published the pair's row maxima
    P_0 = 9  # the even block's P (at the pair's maxima) is in its buffer's P tile
    P_1 = 10  # the odd block's P is in its buffer's P tile
    TAIL_0 = 11  # 128 threads: warpgroup 0 rewrote V rows of its buffer before its P V
    TAIL_1 = 12  # the same for warpgroup 1
    # small-head sparse decode (``kernels.sm90.sparse_decode_heads``), 128 threads
    HEAD_STAT = 13  # its warpgroup's per-warp head maxima (or sums) are in shared memory
    # dense decode's tickets (``kernels.sm90.split_tickets``), every thread in the same order:
    # a ticket is in shared memory / a split's partials are stored and fenced / a merge
    # chunk's splits have all counted
    SPLIT_WORK = 15


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
