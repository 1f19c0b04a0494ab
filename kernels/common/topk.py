"""How many of a row's selected (top-k) slots count, for the sparse kernels."""
import cutlass
import cutlass.cute as cute
from cutlass import Int32


@cute.jit
def counted(topk: Int32, mLength: cute.Tensor, has_length: Int32, i: Int32) -> Int32:
    """Slots of row i (a request, or a query token) that count: its ``mLength[i]`` clamped into
    [0, topk] where ``has_length``, else topk."""
    n = topk
    if has_length != 0:
        n = cutlass.min(cutlass.max(mLength[i], 0), topk)
    return n
