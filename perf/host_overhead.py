"""Host cost of one eager public call (SPEC section 7): tiny problems, back-to-back calls.

Each entry point gets a problem so small that the GPU finishes it faster than the host can launch
it, so the wall time of a call is its Python launch path. ``host_us`` times each call on its own
with ``perf_counter_ns`` after a warm-up and returns the median (and the 10th / 90th percentile):
the median ignores the rare calls that stall on a full launch queue or a garbage collection.

``ENTRIES`` names the three entry points; ``make(entry, lib)`` builds one tiny problem and returns a
zero-argument callable that runs it through ``lib`` ("cute_mla" or "flashmla", the latter through
FlashMLA's compiled ops when ``perf.peer`` found them), reusing one scheduling metadata across calls
as the layers of one decode step do.  ``cold_us(entry)`` runs one call in a fresh interpreter and
reports its wall time there: module load, first schedule and first launch plans included.

The harness (``python -m perf --filter host_overhead``) records one ``host_overhead`` case per entry
point (``params.entry``; decode twice: ``meta`` reused, as every layer after the first of a step,
or fresh, as the first), with FlashMLA's figure of the same run as ``peer_us`` (both timed in turns,
``host_us_interleaved``, 5 x 200 calls each) and the first call as ``cold_us``; ``meta=op`` cases time the torch.library ops (``cute_mla.library``, what
``torch.compile`` runs; decode plans a schedule per call).
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Callable

from perf.cases import BenchCase, register

ENTRIES = ("dense_decode", "sparse_decode", "sparse_prefill")
D_V = 512


def _dense(g):
    import cute_mla
    from cute_mla.testing import make_paged_kv, randn_clipped

    kv = make_paged_kv([200, 150], 64, 1, 576, g, poison=False)
    q = randn_clipped((2, 1, 64, 576), g)
    return dict(q=q, k_cache=kv.k_cache, block_table=kv.block_table, cache_seqlens=kv.cache_seqlens,
                new_meta=lambda: cute_mla.get_mla_metadata()[0])


def _sparse(g):
    import torch

    import cute_mla
    from cute_mla.quant import quantize_kvcache
    from cute_mla.testing import randn_clipped

    b, s_q, h_q, topk, pbs, blocks = 2, 1, 64, 64, 64, 4
    cache = quantize_kvcache(randn_clipped((blocks, pbs, 1, 512), g))
    extra = quantize_kvcache(randn_clipped((blocks, pbs, 1, 512), g))
    idx = torch.randint(0, blocks * pbs, (b, s_q, topk), generator=g, device="cuda", dtype=torch.int32)
    xidx = torch.randint(0, blocks * pbs, (b, s_q, topk), generator=g, device="cuda", dtype=torch.int32)
    return dict(q=randn_clipped((b, s_q, h_q, 512), g), k_cache=cache, indices=idx, extra_k_cache=extra,
                extra_indices=xidx, attn_sink=torch.randn(h_q, generator=g, device="cuda"),
                new_meta=lambda: cute_mla.get_mla_metadata()[0])


def _prefill(g):
    import torch

    from cute_mla.testing import randn_clipped

    s_q, h_q, topk, s_kv = 64, 64, 128, 256
    return dict(q=randn_clipped((s_q, h_q, 576), g), kv=randn_clipped((s_kv, 1, 576), g),
                indices=torch.randint(0, s_kv, (s_q, 1, topk), generator=g, device="cuda", dtype=torch.int32),
                sm_scale=576 ** -0.5)


def make(entry: str, lib: str = "cute_mla", fresh_meta: bool = False) -> Callable[[], object]:
    """A zero-argument call of ``entry`` on a tiny problem through ``lib``.  With ``fresh_meta`` each
    decode call gets a new scheduling metadata (the first layer of every step); otherwise one is
    reused (every later layer)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(1)
    if entry == "dense_decode":
        x = _dense(g)
    elif entry == "sparse_decode":
        x = _sparse(g)
    elif entry == "sparse_prefill":
        x = _prefill(g)
    else:
        raise ValueError(f"entry must be one of {ENTRIES}, got {entry!r}")
    if lib == "flashmla":
        from perf import peer

        return peer.host_call(entry, x, fresh_meta)
    import cute_mla

    if lib == "cute_mla_op":  # the torch.library ops (what torch.compile runs): a schedule per call
        return _op_call(entry, x)
    if entry == "sparse_prefill":
        return lambda: cute_mla.flash_mla_sparse_fwd(x["q"], x["kv"], x["indices"], x["sm_scale"])
    meta = [x["new_meta"]()]

    def sched():
        return x["new_meta"]() if fresh_meta else meta[0]

    if entry == "dense_decode":
        return lambda: cute_mla.flash_mla_with_kvcache(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"],
                                                       D_V, sched(), causal=True)
    return lambda: cute_mla.flash_mla_with_kvcache(
        x["q"], x["k_cache"], None, None, D_V, sched(), is_fp8_kvcache=True, indices=x["indices"],
        attn_sink=x["attn_sink"], extra_k_cache=x["extra_k_cache"], extra_indices_in_kvcache=x["extra_indices"])


def _op_call(entry, x):
    import torch

    import cute_mla.api  # noqa: F401  (importing the API registers torch.ops.cute_mla.*)

    if entry == "sparse_prefill":
        return lambda: torch.ops.cute_mla.sparse_prefill(x["q"], x["kv"], x["indices"], x["sm_scale"], D_V, None, None)
    if entry == "dense_decode":
        return lambda: torch.ops.cute_mla.mla_decode(x["q"], x["k_cache"], x["block_table"], x["cache_seqlens"], D_V,
                                                     None, True, False, None, None, None, None, None, None)
    return lambda: torch.ops.cute_mla.mla_decode(x["q"], x["k_cache"], None, None, D_V, None, False, True,
                                                 x["indices"], x["attn_sink"], x["extra_k_cache"], x["extra_indices"],
                                                 None, None)


def host_us(call: Callable[[], object], calls: int = 1000, warmup: int = 200,
            sync_every: int = 50) -> tuple[float, float, float]:
    """(median, p10, p90) wall microseconds of one ``call()``, each timed on its own after ``warmup``.

    The GPU is drained (untimed) every ``sync_every`` calls, so a call never waits for room in a
    full launch queue: with a new scheduling metadata per call a step's three kernels can take
    longer on the GPU than their launches on the host, and the median would then time the GPU."""
    import torch

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    ts = []
    for i in range(calls):
        t0 = time.perf_counter_ns()
        call()
        ts.append(time.perf_counter_ns() - t0)
        if i % sync_every == sync_every - 1:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    ts = sorted(t / 1e3 for t in ts)
    return statistics.median(ts), ts[len(ts) // 10], ts[(9 * len(ts)) // 10]


def host_us_interleaved(calls: dict, rounds: int = 5, per_round: int = 200, warmup: int = 200,
                        sync_every: int = 50, sync: Callable[[], None] | None = None) -> dict:
    """``host_us`` of several calls timed in turns, ``per_round`` calls of each per round: name ->
    (median, p10, p90).  A slow stretch of the host (seen right after the GPU test suite: both
    libraries' first case 2x slower) then weighs on every call alike, so their ratio holds."""
    if sync is None:
        import torch

        sync = torch.cuda.synchronize
    for call in calls.values():
        for _ in range(warmup):
            call()
    sync()
    ts = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for i in range(per_round):
                t0 = time.perf_counter_ns()
                call()
                ts[name].append(time.perf_counter_ns() - t0)
                if i % sync_every == sync_every - 1:
                    sync()
            sync()
    out = {}
    for name, t in ts.items():
        t = sorted(x / 1e3 for x in t)
        out[name] = (statistics.median(t), t[len(t) // 10], t[(9 * len(t)) // 10])
    return out


def cold_us(entry: str, lib: str = "cute_mla") -> float:
    """Wall microseconds of the first call of ``entry`` in a fresh interpreter (inputs built first)."""
    code = ("import time, torch; from perf import host_overhead as h; "
            f"c = h.make({entry!r}, {lib!r}); torch.cuda.synchronize(); t = time.perf_counter_ns(); c(); "
            "print('COLD', (time.perf_counter_ns() - t) / 1e3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("COLD")))


@register
def host_overhead_cases():
    for entry in ENTRIES:
        for meta in (("reused", "fresh", "op") if entry != "sparse_prefill" else ("none", "op")):
            yield BenchCase("host_overhead", {"entry": entry, "meta": meta}, "host", flops=0.0, bytes=0.0,
                            make_inputs=lambda e=entry, m=meta: make(e, "cute_mla_op" if m == "op" else "cute_mla",
                                                                     fresh_meta=m == "fresh"),
                            run=lambda call: call())


if __name__ == "__main__":
    libs = sys.argv[1:] or ["cute_mla"]
    for lib in libs:
        for entry in ENTRIES:
            for fresh in ((False, True) if entry != "sparse_prefill" else (False,)):
                try:
                    med, p10, p90 = host_us(make(entry, lib, fresh))
                    print(f"{lib:9s} {entry:15s} {'fresh meta' if fresh else 'reused meta':11s} "
                          f"median {med:7.1f} us  p10 {p10:7.1f}  p90 {p90:7.1f}", flush=True)
                except Exception as e:  # one failing library must not hide the other's numbers
                    print(f"{lib:9s} {entry:15s} FAILED {type(e).__name__}: {e}", flush=True)
