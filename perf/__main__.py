"""python -m perf: time every registered case against this GPU's measured roofline and write the results.

    python -m perf [--filter SUBSTR ...] [--out DIR] [--iters N] [--no-png] [--list] [--commit SHA]
                   [--peer flashmla[=PATH] [--rounds N]]

With ``--peer flashmla`` every case that has a FlashMLA counterpart runs through both libraries on the
same inputs, one after the other (decode inside CUDA graphs, prefill eagerly), and records ``peer_us``,
``speedup`` (peer_us / us) and whether the two outputs agree within SPEC's tolerances (``agree``).
``--rounds N`` repeats that N times on fresh input sets and records the medians and the speedup's
range (``speedup_min`` / ``speedup_max``).

On the GPU machine the tree is a copy without .git: pass --commit or CUTE_MLA_COMMIT=$(git rev-parse --short HEAD).
"""
from __future__ import annotations

import argparse
import sys

from perf import cases as registry
from perf import report


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__.splitlines()[0])
    p.add_argument("--filter", action="extend", nargs="+", default=[], metavar="SUBSTR",
                   help="run only cases whose name ('kernel k=v ...') contains any of these substrings")
    p.add_argument("--out", default=str(report.DEFAULT_OUT), help="output directory (default: perf/results)")
    p.add_argument("--iters", type=int, default=100, help="timed calls per case (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per case first (default 10)")
    p.add_argument("--rotate", type=int, default=None,
                   help="input sets to cycle through (default: enough to exceed L2, see perf/timing.py)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG chart")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit (no GPU needed)")
    p.add_argument("--commit", default=None, help="commit id to record (default: $CUTE_MLA_COMMIT or git)")
    p.add_argument("--provider", action="extend", nargs="+", default=[], metavar="MODULE",
                   help="extra provider modules to import besides perf.cases.PROVIDER_MODULES")
    p.add_argument("--peer", default=None, metavar="flashmla[=PATH]",
                   help="time FlashMLA's compiled ops on the same inputs, side by side (PATH: a _flashmla_C*.so; "
                        "default: an installed flash_mla, vllm._flashmla_C, $CUTE_MLA_PEER or .peers/)")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --peer: time both sides this many times, each round on fresh input sets "
                        "(new allocations), and report the medians and the speedup's range (default 1)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.peer is not None:
        name, _, path = args.peer.partition("=")
        if name != "flashmla":
            p.error(f"--peer takes flashmla or flashmla=PATH, got {args.peer!r}")
        args.peer_path = path or None
    return args


def _side_by_side(case, ops, args, say) -> dict:
    """Time ``case`` and its FlashMLA counterpart on the same input sets, ``args.rounds`` times
    with fresh input sets (new allocations) each round, ours then FlashMLA's; check that their
    outputs agree.  The figures are the medians over the rounds (``rounds_summary``)."""
    from perf import timing

    n = args.rotate or case.rotate or timing.rotate_count(case.bytes)
    ours_t, peer_t, agree, worst = [], [], True, 0.0
    for _ in range(args.rounds):
        inputs = [case.make_inputs() for _ in range(n)]
        ours = theirs = None
        try:
            ours = [lambda x=x: case.run(x) for x in inputs]
            theirs = [case.peer(ops, x) for x in inputs]
            ok, w = _agree(case.compare, ours[0](), theirs[0]())
            agree, worst = agree and ok, max(worst, w)
            ours_t.append(timing.time_side(ours, case.graph, args.iters, args.warmup))
            peer_t.append(timing.time_side(theirs, case.graph, args.iters, args.warmup))
        finally:
            del inputs, ours, theirs
            import torch
            torch.cuda.empty_cache()
    res = rounds_summary(ours_t, peer_t)
    say(f"{case.name}: {res['us']:.2f} us, FlashMLA {res['peer_us']:.2f} us, speedup {res['speedup']:.3f}"
        + (f" (rounds {res['speedup_min']:.3f}-{res['speedup_max']:.3f})" if args.rounds > 1 else "")
        + ("" if agree else f", OUTPUTS DIFFER (worst {worst:.1f}x the tolerance)"))
    return dict(res, iters=ours_t[0].iters, rotate=ours_t[0].rotate, agree=agree, agree_worst=worst,
                timed="graph" if case.graph else "eager")


def rounds_summary(ours: list, peer: list) -> dict:
    """Medians over rounds of the two sides' per-round medians (``timing.Timing``), the speedup
    of those, and each round's own speedup range: one process's timing can sit 10% off
    another's for the same build (perf/results/NOTES.md, session 10), so a kernel decision needs
    the spread."""
    import statistics

    us = statistics.median(t.us for t in ours)
    peer_us = statistics.median(t.us for t in peer)
    per_round = [p.us / o.us for o, p in zip(ours, peer)]
    return dict(us=us, us_p10=statistics.median(t.p10_us for t in ours),
                us_p90=statistics.median(t.p90_us for t in ours), peer_us=peer_us, speedup=peer_us / us,
                speedup_min=min(per_round), speedup_max=max(per_round), rounds=len(per_round),
                us_rounds=[t.us for t in ours], peer_us_rounds=[t.us for t in peer])


def _agree(kinds, ours, theirs) -> tuple[bool, float]:
    """(all outputs within SPEC's tolerance of the peer's, the worst error as a multiple of it)."""
    from cute_mla.testing import TOLERANCES, check_close

    ok, worst = True, 0.0
    for kind, a, b in zip(kinds, ours, theirs):
        tol = TOLERANCES[kind]
        r = check_close(kind, a.float(), b.float(), tol.abs, tol.rel, tol.cos)
        ok &= r.ok
        worst = max(worst, r.worst_ratio)
    return ok, worst


def _progress(items):
    """tqdm when available, else one stderr line per case: '[3/12] dense_decode b=128 ...'.

    tqdm only on a terminal: captured logs (the GPU machine's output tail) would fill with carriage-return redraws.
    """
    try:
        from tqdm import tqdm
        if not sys.stderr.isatty():
            raise ImportError
    except ImportError:
        for i, c in enumerate(items, 1):
            print(f"[{i}/{len(items)}] {c.name} ...", file=sys.stderr, flush=True)
            yield c, lambda msg: print(f"    {msg}", file=sys.stderr, flush=True)
        return
    bar = tqdm(items, unit="case", file=sys.stderr)
    for c in bar:
        bar.set_description(c.name[:60])
        yield c, tqdm.write


def _host_case(case, common: dict, say) -> dict:
    """A host_overhead case: host us per call (median, p10, p90), FlashMLA's in the same run when
    ``perf.peer`` finds it, and the first call's cost in a fresh interpreter."""
    from perf import host_overhead

    entry, meta = case.params["entry"], case.params.get("meta")
    extra = {}
    try:
        calls = {"ours": case.make_inputs()}
        calls["ours"]()
    except Exception as e:   # report and go on
        msg = f"{type(e).__name__}: {e}".strip()
        say(f"FAILED {case.name}: {msg.splitlines()[0] if msg else ''}")
        return report.case_entry(us=None, error=msg, **common)
    try:  # the op path plans a schedule per call: FlashMLA's fresh-metadata call is its peer
        peer = host_overhead.make(entry, "flashmla", meta in ("fresh", "op"))
        peer()
        calls["peer"] = peer
    except Exception as e:   # no peer here, or it refuses the case: the case still stands
        extra["peer_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    times = host_overhead.host_us_interleaved(calls)  # in turns: a slow stretch weighs on both
    med, p10, p90 = times["ours"]
    extra.update(us_p10=p10, us_p90=p90)
    if "peer" in times:
        extra["peer_us"] = times["peer"][0]
    if meta in ("reused", "none"):
        extra["cold_us"] = host_overhead.cold_us(entry)
    say(f"{case.name}: {med:.1f} us/call (FlashMLA {extra.get('peer_us', float('nan')):.1f})")
    return report.case_entry(us=med, **extra, **common)


def main(argv=None) -> int:
    args = _parse(argv)
    load_errors: list[str] = []
    selected = registry.all_cases(args.filter, args.provider, load_errors)
    for err in load_errors:
        print(f"error: {err}", file=sys.stderr)

    if args.list:
        for c in selected:
            print(f"{c.name}  [{c.bound}-bound, {c.flops:.3g} FLOP, {c.bytes:.3g} B]")
        print(f"{len(selected)} case(s)", file=sys.stderr)
        return 1 if load_errors else 0

    import torch
    if not torch.cuda.is_available():
        print("error: python -m perf needs a CUDA GPU, and torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Run it on the GPU machine; --list works without one.",
              file=sys.stderr)
        return 2
    if args.filter and not selected:
        print(f"error: no case matches --filter {' '.join(args.filter)} (see --list)", file=sys.stderr)
        return 2

    from perf import roofline, timing   # these need CUDA
    device = torch.cuda.get_device_name()
    print(f"measuring roofline on {device} ...", file=sys.stderr, flush=True)
    roof = roofline.measure()
    print(f"roofline: copy {roof['copy_gbs']:.1f} GB/s, bf16 GEMM {roof['gemm_tflops']:.1f} TFLOPS",
          file=sys.stderr, flush=True)

    ops = None
    if args.peer is not None:
        from perf import peer
        try:
            ops = peer.load(args.peer_path)
        except RuntimeError as e:
            print(f"error: --peer: {e}", file=sys.stderr)
            return 2

    entries = []
    for case, say in _progress(selected):
        common = dict(kernel=case.kernel, params=case.params, bound=case.bound, flops=case.flops,
                      bytes=case.bytes, roofline=roof, published=case.published)
        if case.bound == "host":
            entries.append(_host_case(case, common, say))
            continue
        if ops is not None and case.peer is not None:
            try:
                entries.append(report.case_entry(**_side_by_side(case, ops, args, say), **common))
            except Exception as e:   # report and go on
                msg = f"{type(e).__name__}: {e}".strip()
                say(f"FAILED {case.name}: {msg.splitlines()[0] if msg else ''}")
                entries.append(report.case_entry(us=None, error=msg, **common))
            continue
        try:
            t = timing.time_case(case, iters=args.iters, warmup=args.warmup, rotate=args.rotate)
        except Exception as e:   # report and go on: one broken kernel must not hide the others' numbers
            msg = f"{type(e).__name__}: {e}".strip()
            say(f"FAILED {case.name}: {msg.splitlines()[0] if msg else ''}")
            entries.append(report.case_entry(us=None, error=msg, **common))
            continue
        entries.append(report.case_entry(us=t.us, us_p10=t.p10_us, us_p90=t.p90_us, iters=t.iters,
                                         rotate=t.rotate, **common))
        e = entries[-1]
        say(f"{case.name}: {t.us:.2f} us, ratio {e['ratio']:.3f}" if e["ratio"] is not None
            else f"{case.name}: {t.us:.2f} us")

    rep = report.build_report(entries, roof, device, report.git_commit(args.commit))
    paths = report.write_report(rep, args.out, png=not args.no_png)
    print(report.markdown(rep))
    print("wrote " + ", ".join(str(p) for p in paths.values() if p), file=sys.stderr)
    failed = sum(1 for e in entries if e.get("error")) + len(load_errors)
    if failed:
        print(f"error: {failed} failure(s), see above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
