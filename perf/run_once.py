"""Run one benchmark case a few times with no timing, for profilers:

    ncu --clock-control none -k regex:dense_decode -c 1 python -m perf.run_once "dense_decode b=128 s_q=1 s_k=32768"
"""
from __future__ import annotations

import sys

from perf.cases import all_cases


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    cases = all_cases(argv[0])
    if not cases:
        print(f"no case matches {argv[0]!r}", file=sys.stderr)
        return 2
    import torch

    case = cases[0]
    print(f"running {case.name}", file=sys.stderr)
    inputs = case.make_inputs()
    for _ in range(int(argv[1]) if len(argv) > 1 else 3):
        case.run(inputs)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
