"""The installed shape (CPU): what a wheel holds, that a wheel never ships without its kernels, and
that the cubins' fingerprints follow every source file a kernel imports.

Each test works on a copy of the repository's package sources in a temporary folder, so the
checkout is never written to.  The wheel tests need the cubins built (the README's set-up
command builds them).
"""
import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from cute_mla import launcher, registry

REPO = Path(__file__).resolve().parent.parent
CUBINS = Path("cute_mla") / "_cubins"


def copy_repo(dest: Path, with_cubins: bool) -> Path:
    """The files a wheel is built from (package folders, pyproject.toml, setup.py, README.md),
    without build outputs; with the cubins when asked."""
    skip = shutil.ignore_patterns("__pycache__", "_cubins", "*.egg-info")
    for folder in ("cute_mla", "kernels", "layouts", "schedules"):
        shutil.copytree(REPO / folder, dest / folder, ignore=skip)
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / f, dest / f)
    if with_cubins:
        shutil.copytree(launcher.DEFAULT_CUBIN_DIR, dest / CUBINS)
    return dest


def build_wheel(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, cwd=out)


def test_wheel_holds_every_cubin_and_no_other_top_level_package(tmp_path):
    src = copy_repo(tmp_path / "src", with_cubins=True)
    res = build_wheel(src, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("cute_mla-*.whl"))).namelist()
    assert {n.split("/")[0] for n in names} == {"cute_mla", next(n.split("/")[0] for n in names
                                                                  if n.split("/")[0].endswith(".dist-info"))}
    for arch in registry.ARCHS:
        manifest = f"cute_mla/_cubins/{arch}/manifest.json"
        assert manifest in names
        for kd, cfg, _ in registry.variants(arch):
            assert f"cute_mla/_cubins/{arch}/{kd.key(cfg)}.cubin" in names
    for module in ("cute_mla/kernels/sm90/dense_decode.py", "cute_mla/layouts/abi.py",
                   "cute_mla/schedules/decode_plan.py"):
        assert module in names
    assert not any(n.startswith(("cute_mla/perf", "cute_mla/tests")) for n in names)


def test_wheel_without_cubins_is_refused_with_the_fix(tmp_path):
    src = copy_repo(tmp_path / "src", with_cubins=False)
    res = build_wheel(src, tmp_path)
    assert res.returncode != 0 and not list(tmp_path.glob("*.whl"))
    assert "refusing to build a wheel without its kernels" in res.stdout + res.stderr
    assert "python -m cute_mla.compile" in res.stdout + res.stderr


REBUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import cute_mla
    from cute_mla import compile, launcher, registry, sources

    assert Path(cute_mla.__file__).resolve().is_relative_to(Path.cwd().resolve()), cute_mla.__file__

    compile._dsl_version = lambda: compile.DSL_PIN
    compile.compile_variant = lambda kd, cfg, arch: (b"cubin", {"kernel": kd.name, "dsl_version": compile.DSL_PIN})
    out = Path(sys.argv[1])
    compile.build(["sm_90a"], out, log=lambda s: None)
    manifest = json.loads((out / "sm_90a" / "manifest.json").read_text())["kernels"]
    dep = Path("kernels") / "common" / "named_barrier.py"
    dep.write_text(dep.read_text() + "\\n# edited\\n")
    sources._file_digest.cache_clear()  # as a new process would see the sources
    sources.direct_imports.cache_clear()
    stale = []
    for kd, cfg, arch in registry.variants("sm_90a"):
        try:
            launcher.check_fresh(kd.key(cfg), kd, cfg, arch, manifest[kd.key(cfg)])
        except launcher.CubinsNotBuilt:
            stale.append(kd.key(cfg))
    rebuilt = []
    compile.build(["sm_90a"], out, log=lambda s: rebuilt.append(s.split()[2].rstrip(":")) if "compiled" in s else None)
    print(json.dumps({"stale": stale, "rebuilt": rebuilt}))
""")


def test_editing_an_imported_module_rebuilds_its_variants_and_stales_their_cubins(tmp_path):
    """kernels/common/named_barrier.py is imported (through other modules) by the SM90 attention
    kernels, not by the combine or the scheduler: an edit rebuilds exactly those variants, and the
    launcher refuses their old cubins."""
    src = copy_repo(tmp_path / "src", with_cubins=False)
    res = subprocess.run([sys.executable, "-c", REBUILD_SCRIPT, str(tmp_path / "cubins")], cwd=src,
                         capture_output=True, text=True, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    expected = sorted(kd.key(cfg) for kd, cfg, _ in registry.variants("sm_90a")
                      if kd.name in ("dense_decode_sm90", "dense_decode_heads_sm90", "sparse_prefill_sm90",
                                     "sparse_decode_sm90", "sparse_decode_heads_sm90"))
    assert sorted(got["stale"]) == expected
    assert sorted(got["rebuilt"]) == expected


def test_launcher_refuses_a_stale_manifest_entry():
    kd = registry.get("combine")
    cfg = dict(kd.variants[0])
    manifest = json.loads((launcher.DEFAULT_CUBIN_DIR / "sm_90a" / "manifest.json").read_text())
    entry = manifest["kernels"][kd.key(cfg)]
    launcher.check_fresh(kd.key(cfg), kd, cfg, "sm_90a", entry)  # as built: fresh
    for bad in (dict(entry, fingerprint="0" * 16), dict(entry, sources=[]),
                dict(entry, sources=entry["sources"] + ["cute_mla.no_such_module"])):
        with pytest.raises(launcher.CubinsNotBuilt, match="stale"):
            launcher.check_fresh(kd.key(cfg), kd, cfg, "sm_90a", bad)


def test_compile_cli_lists_variants_and_takes_perf_names(capsys):
    from cute_mla import compile

    assert compile.main(["--list", "--arch", "sm_90a"]) == 0
    listing = capsys.readouterr().out
    for kd, cfg, _ in registry.variants("sm_90a"):
        assert kd.key(cfg) in listing
    for perf_name, kernels in (("dense_decode", {"dense_decode_sm90", "dense_decode_heads_sm90"}),
                               ("scheduler", {"decode_scheduler"}), ("sparse_prefill", {"sparse_prefill_sm90"}),
                               ("combine", {"combine"})):
        assert {kd.name for kd, _, _ in registry.variants(only=[perf_name])} == kernels
    assert "default: all of them" in " ".join(compile_help().split())


def compile_help() -> str:
    res = subprocess.run([sys.executable, "-m", "cute_mla.compile", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    return res.stdout
