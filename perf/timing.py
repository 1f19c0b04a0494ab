"""Device-side timing of one case (see /work/.library/device/METHOD.md, "Time properly").

Each timed call is bracketed by its own pair of CUDA events and the median is reported. Two details matter for
small kernels:
- L2: if one input set fits in L2, back-to-back calls on it time the cache, so calls rotate over several fresh
  input sets whose total size is a few times L2.
- Host launch overhead: a Python wrapper can take longer to launch than a small kernel takes to run, and then
  the GPU sits idle between the start event and the kernel, and that idle time gets counted. A short GPU spin
  (``torch.cuda._sleep``) queued before each start event lets the host enqueue the whole call first, so the
  events bracket only device work.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_L2_BYTES = 50 << 20      # H100/H200; used when torch does not report the size
MAX_ROTATE = 16
ROTATE_BUDGET_BYTES = 2 << 30    # never build more than ~2 GiB of extra input sets just to defeat L2
SPIN_CYCLES_PER_US = 2000        # ~2 GHz SM clock; over-spinning only costs wall time, never accuracy


@dataclass
class Timing:
    us: float        # median
    p10_us: float
    p90_us: float
    iters: int
    rotate: int


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotate_count(case_bytes: float) -> int:
    """How many input sets to cycle through so that consecutive calls do not find each other's data in L2."""
    if case_bytes <= 0:
        return 4
    if case_bytes >= 3 * l2_bytes():
        return 1                                        # one call already streams through L2 several times
    want = math.ceil(3 * l2_bytes() / case_bytes) + 1
    afford = max(2, int(ROTATE_BUDGET_BYTES // case_bytes))
    return max(2, min(want, afford, MAX_ROTATE))


def _spin(cycles: int) -> None:
    if cycles > 0 and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(cycles)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def time_calls(call: Callable[[int], None], n_sets: int, iters: int = 100, warmup: int = 10) -> Timing:
    """Time ``call(i)`` (i = input-set index, cycling over n_sets) with CUDA events; return median etc. in us."""
    iters = max(1, iters)
    host = []
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        call(i % n_sets)
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    # Spin for a few times the host launch time (at least 20 us) so the launch is queued before the start event.
    spin = int(max(20.0, 3e6 * statistics.median(host)) * SPIN_CYCLES_PER_US)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        _spin(spin)
        starts[i].record()
        call(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()   # also raises any asynchronous CUDA error from the calls
    us = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return Timing(statistics.median(us), _pct(us, 0.1), _pct(us, 0.9), iters, n_sets)


def time_case(case, iters: int = 100, warmup: int = 10, rotate: int | None = None) -> Timing:
    """Build the case's input sets, time ``case.run`` over them, and free them again."""
    n = rotate or case.rotate or rotate_count(case.bytes)
    inputs = [case.make_inputs() for _ in range(n)]
    torch.cuda.synchronize()
    try:
        return time_calls(lambda i: case.run(inputs[i]), n, iters, warmup)
    finally:
        del inputs
        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass   # a broken context must not mask the case's own error


def capture_graphs(calls: list[Callable[[], object]], warmup: int = 2) -> list:
    """One CUDA graph per call, each captured after ``warmup`` eager calls on a side stream (which plan,
    load modules and bind schedules outside the capture, as an engine's warm-up does)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            for _ in range(warmup):
                call()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for call in calls:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            call()
        graphs.append(g)
    torch.cuda.synchronize()
    return graphs


def time_side(calls: list[Callable[[], object]], graph: bool, iters: int, warmup: int) -> Timing:
    """Time one library's calls (one per input set), replayed from CUDA graphs or eagerly."""
    if graph:
        graphs = capture_graphs(calls)
        return time_calls(lambda i: graphs[i].replay(), len(graphs), iters, warmup)
    return time_calls(lambda i: calls[i](), len(calls), iters, warmup)
