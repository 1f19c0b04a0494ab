"""Run each entry point of an *installed* cute-mla once against its float32 reference (GPU).

    python -m venv --system-site-packages /tmp/v && /tmp/v/bin/pip install --no-deps cute_mla-*.whl
    cd /tmp && /tmp/v/bin/python /path/to/check_installed.py

Run it from outside the repository, so that ``import cute_mla`` finds the wheel: it prints where
the package and its cubins were loaded from, and fails if that is a source checkout.  Not a
pytest module (pytest collects ``test_*.py`` only): the GPU test suite covers the same paths
from the checkout.
"""
import sys
from pathlib import Path

import cute_mla
from cute_mla import launcher
from cute_mla.testing import ENTRY_POINTS, SHARP, entry_case


def main() -> int:
    where = Path(cute_mla.__file__).resolve().parent
    print(f"cute_mla from {where}; cubins from {launcher.cubin_dir()}")
    if (where.parent / "kernels").is_dir() or "site-packages" not in str(where):
        print("error: this is a source checkout, not an installed wheel; run from outside the repository")
        return 1
    for entry in ENTRY_POINTS:  # sharp data: a wrong scale or a uniform average fails
        x, call, check = entry_case(entry, "cuda", 0, SHARP[0])
        check(x, call(x))
        print(f"ok: {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
