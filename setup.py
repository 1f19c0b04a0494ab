"""Wheel builds carry every kernel: the build refuses to package cubins that are missing or stale.

Everything else about the package is in pyproject.toml.  The cubins are built beforehand, on any
machine, by ``python -m cute_mla.compile`` (it needs the DSL: ``pip install -e '.[build]'``);
this check needs neither the DSL nor torch.  Editable installs are not checked (the launcher
checks the cubins when it loads them).
"""
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def cubin_problems() -> list:
    """What is missing or stale in cute_mla/_cubins, one line each (empty when all is built)."""
    # Check this tree's cute_mla, not an installed one: an editable install of another checkout
    # maps the name through a finder on sys.meta_path, so those finders step aside meanwhile.
    saved_path, saved_meta = sys.path[:], sys.meta_path[:]
    sys.path.insert(0, str(HERE))
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
    for name in [m for m in sys.modules if m == "cute_mla" or m.startswith("cute_mla.")]:
        del sys.modules[name]
    try:
        import json

        from cute_mla import launcher, registry

        assert Path(launcher.__file__).resolve().is_relative_to(HERE), launcher.__file__

        problems = []
        for arch in registry.ARCHS:
            arch_dir = launcher.DEFAULT_CUBIN_DIR / arch
            path = arch_dir / "manifest.json"
            if not path.exists():
                problems.append(f"{arch}: no manifest.json")
                continue
            kernels = json.loads(path.read_text())["kernels"]
            for kd, cfg, _ in registry.variants(arch):
                key = kd.key(cfg)
                entry = kernels.get(key)
                if entry is None or not (arch_dir / entry["cubin"]).exists():
                    problems.append(f"{arch}/{key}: not built")
                    continue
                try:
                    launcher.check_fresh(key, kd, cfg, arch, entry)
                except launcher.CubinsNotBuilt:
                    problems.append(f"{arch}/{key}: stale (its sources changed since it was compiled)")
        return problems
    finally:
        sys.path[:], sys.meta_path[:] = saved_path, saved_meta


class BuildPyWithCubins(build_py):
    def run(self):
        if not getattr(self, "editable_mode", False):
            problems = cubin_problems()
            if problems:
                shown = "\n  ".join(problems[:8]) + ("\n  ..." if len(problems) > 8 else "")
                raise SystemExit(
                    "cute-mla: refusing to build a wheel without its kernels:\n  " + shown + "\n"
                    "Compile them first (any machine, no GPU): pip install -e '.[build]' && "
                    "python -m cute_mla.compile; then build the wheel again.")
        super().run()


setup(cmdclass={"build_py": BuildPyWithCubins})
