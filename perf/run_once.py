"""Run one benchmark case a few times with no timing, for profilers:

    ncu --clock-control none -k regex:dense_decode -c 1 python -m perf.run_once "dense_decode b=128 s_q=1 s_k=32768"
    python -m perf.run_once CASE [CALLS] [--peer]

``--peer`` runs FlashMLA's op on the same inputs after each of our calls (``perf.peer``: an
installed flash_mla, vllm._flashmla_C, ``$CUTE_MLA_PEER`` or ``.peers/``), so that one profile
holds both libraries' kernels of the case, ours first.
"""
from __future__ import annotations

import argparse
import sys

from perf.cases import all_cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.run_once", description=__doc__.splitlines()[0])
    p.add_argument("case", help="a case name filter (the first matching case runs)")
    p.add_argument("calls", nargs="?", type=int, default=3)
    p.add_argument("--peer", action="store_true", help="FlashMLA's call too, after each of ours")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cases = all_cases(args.case)
    if not cases:
        print(f"no case matches {args.case!r}", file=sys.stderr)
        return 2
    case = cases[0]
    if args.peer and case.peer is None:
        print(f"{case.name} has no FlashMLA counterpart", file=sys.stderr)
        return 2
    import torch

    print(f"running {case.name}", file=sys.stderr)
    inputs = case.make_inputs()
    theirs = None
    if args.peer:
        from perf import peer

        theirs = case.peer(peer.load(), inputs)
    for _ in range(args.calls):
        case.run(inputs)
        if theirs is not None:
            theirs()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
