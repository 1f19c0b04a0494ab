"""Kernel timeline of one bench case, both libraries (kineto/CUPTI, no ncu: caches and clocks as in the grid).

    PYTHONPATH=. python perf/results/pending/timeline.py "dense_decode b=5 " [--iters 30]

For each side, graph replays of one call each (as ``perf`` times them) and eager calls, each after a
spin: per kernel name, the median GPU duration; per call, the span from the first kernel's start to
the last kernel's end and the gaps between its kernels.  Prints one table; writes nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from perf import peer as peer_mod
from perf.cases import all_cases
from perf.timing import capture_graphs


def kernels_of(prof):
    """[(name, start_us, end_us)] of the GPU kernels, in start order."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and "spin_kernel" not in e.name:
            out.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(out, key=lambda k: k[1])


def group_calls(ks, per_call):
    return [ks[i:i + per_call] for i in range(0, len(ks) - per_call + 1, per_call)]


def side(label, calls, graph, iters):
    graphs = capture_graphs(calls) if graph else None
    run = (lambda i: graphs[i % len(graphs)].replay()) if graph else (lambda i: calls[i % len(calls)]())
    for i in range(5):
        run(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            torch.cuda._sleep(200000)  # ~100 us: the call is queued before the GPU reaches it
            run(i)
        torch.cuda.synchronize()
    ks = kernels_of(prof)
    per_call = max(1, len(ks) // iters)
    calls_k = group_calls(ks, per_call)
    names = [k[0] for k in calls_k[0]]
    print(f"== {label} {'graph' if graph else 'eager'}: {len(ks)} kernels, {per_call} a call")
    for j, n in enumerate(names):
        d = statistics.median(c[j][2] - c[j][1] for c in calls_k)
        print(f"   kernel {j} {d:8.2f} us  {n[:90]}")
    span = statistics.median(c[-1][2] - c[0][1] for c in calls_k)
    print(f"   span (first start to last end) {span:8.2f} us")
    for j in range(1, per_call):
        gap = statistics.median(c[j][1] - c[j - 1][2] for c in calls_k)
        print(f"   gap {j - 1}->{j} (start of {j} less end of {j - 1}) {gap:8.2f} us")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("filter", nargs="+")
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args(argv)
    ops = peer_mod.load()
    for case in all_cases(a.filter):
        print(f"#### {case.name}")
        xs = [case.make_inputs() for _ in range(2)]
        ours = [lambda x=x: case.run(x) for x in xs]
        theirs = [case.peer(ops, x) for x in xs]
        for graph in (True, False) if case.graph else (False,):
            for label, calls in (("cute-mla", ours), ("flashmla", theirs)):
                try:
                    side(label, calls, graph, a.iters)
                except Exception as e:  # a profiler that records no kernels in graphs: say so, go on
                    print(f"== {label} {'graph' if graph else 'eager'}: {type(e).__name__}: {e}")
        del xs
        torch.cuda.empty_cache()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
