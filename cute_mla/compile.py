"""Ahead-of-time compilation of every registered kernel variant to cubins.

    python -m cute_mla.compile [--arch sm_90a sm_100a] [--out DIR] [--only NAME ...] [--force] [--list]

Runs on a machine with no GPU (the CuTe DSL cross-compiles).  Per arch it writes
``<out>/<arch>/<key>.cubin`` and ``<out>/<arch>/manifest.json`` with each
variant's kernel symbol, parameter ABI (sizes/alignments as the PTX declares
them, checked against ``layouts.operands``), block and cluster dims, dynamic
shared memory, PDL use, DSL version, the modules it is built from (its import
closure) and their fingerprint.  A variant whose fingerprint is unchanged and whose
cubin exists is skipped; the launcher refuses one whose fingerprint no longer
matches the sources beside it.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from cute_mla import registry, sources
from cute_mla.launcher import DEFAULT_CUBIN_DIR as DEFAULT_OUT
from cute_mla.layouts import abi

DSL_PIN = "4.8.1"


class CompileError(RuntimeError):
    pass


def _dsl_version() -> str:
    import cutlass

    return getattr(cutlass, "__version__", "unknown")


def fingerprint(kd: registry.KernelDef, config: dict, arch: str, dsl_version: str) -> tuple[str, tuple[str, ...]]:
    """(fingerprint, modules) of a variant: the hash of everything that decides its cubin, and the
    modules it is built from, derived from the imports (``cute_mla.sources``)."""
    modules = sources.variant_modules(kd.source)
    return sources.fingerprint(kd.source, kd.abi(config), config, arch, dsl_version, modules), modules


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(b8|u32|s32|u64|s64|f32|b32|b64)\s+\S+?(?:\[(\d+)\])?\s*$")


def ptx_params(ptx: str) -> tuple[str, list[dict]]:
    """(entry symbol, [{size, align}]) of the single kernel entry in a PTX module."""
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1:
        raise CompileError(f"expected exactly one .entry in PTX, found {len(entries)}")
    sym, body = entries[0]
    params = []
    for line in (s.strip().rstrip(",") for s in body.split("\n")):
        if not line:
            continue
        m = _PARAM.match(line)
        if not m:
            raise CompileError(f"unrecognised PTX parameter: {line!r}")
        align, kind, count = m.groups()
        width = {"b8": 1, "u32": 4, "s32": 4, "f32": 4, "b32": 4, "u64": 8, "s64": 8, "b64": 8}[kind]
        size = width * int(count) if count else width
        params.append({"size": size, "align": int(align) if align else width})
    return sym, params


def _reqntid(ptx: str) -> list[int]:
    m = re.search(r"\.reqntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?", ptx)
    if not m:
        raise CompileError("kernel has no .reqntid (block size not fixed at compile time)")
    return [int(x) if x else 1 for x in m.groups()]


def check_abi(key: str, expected: list[dict], actual: list[dict]) -> None:
    if [(p["size"], p["align"]) for p in expected] != [(p["size"], p["align"]) for p in actual]:
        raise CompileError(
            f"{key}: kernel parameters in the PTX {[(p['size'], p['align']) for p in actual]} do not match "
            f"the ABI in layouts.operands {[(p['name'], p['size'], p['align']) for p in expected]}")


def check_arg_names(key: str, cls, spec) -> None:
    """The kernel's ``@cute.jit __call__`` must take the ABI's arguments under the ABI's names, in
    order (then ``stream``), so that binding by name at launch means what it says."""
    params = list(inspect.signature(cls.__call__).parameters)[1:]
    names = [a.name for a in spec] + ["stream"]
    if params != names:
        raise CompileError(f"{key}: {cls.__name__}.__call__ takes ({', '.join(params)}) but its ABI in "
                           f"layouts.operands names ({', '.join(names)})")


def compile_variant(kd: registry.KernelDef, config: dict, arch: str) -> tuple[bytes, dict]:
    """Compile one variant; returns (cubin bytes, manifest entry without fingerprint)."""
    import cutlass.cute as cute

    from cute_mla.kernels.common.fake import fake_args

    mod_name, cls_name = kd.source.split(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    obj = cls(**config)
    spec = kd.abi(config)
    check_arg_names(kd.key(config), cls, spec)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = cute.compile(
            obj, *fake_args(spec), cute.runtime.make_fake_stream(),
            options=f"--gpu-arch {arch} --keep-cubin --keep-ptx --dump-dir={tmp}")
        cubin, ptx = compiled.__cubin__, compiled.__ptx__
    if not cubin or not ptx:
        raise CompileError(f"{kd.key(config)}: the DSL returned no cubin/PTX")
    symbol, params = ptx_params(ptx)
    expected = abi.param_layout(spec)
    check_abi(kd.key(config), expected, params)
    entry = {
        "kernel": kd.name,
        "config": config,
        "symbol": symbol,
        "params": expected,
        "block": _reqntid(ptx),
        "cluster": list(getattr(obj, "cluster", (1, 1, 1))),
        "smem_bytes": int(obj.smem_bytes),
        "pdl_wait": "griddepcontrol.wait" in ptx,
        "pdl_trigger": "griddepcontrol.launch_dependents" in ptx,
        "dsl_version": _dsl_version(),
    }
    return cubin, entry


def load_manifest(arch_dir: Path) -> dict:
    path = arch_dir / "manifest.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"arch": arch_dir.name, "kernels": {}}


def _write_manifest(arch_dir: Path, manifest: dict) -> None:
    tmp = arch_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, arch_dir / "manifest.json")


def build(archs, out: Path, only=None, force: bool = False, log=print) -> int:
    """Build variants; returns the number compiled (cached ones excluded)."""
    dsl_version = _dsl_version()
    if dsl_version != DSL_PIN:
        log(f"warning: nvidia-cutlass-dsl {dsl_version} installed, cute-mla pins {DSL_PIN}")
    todo = [v for a in archs for v in registry.variants(a, only)]
    if only and not todo:
        raise CompileError(f"--only {only} matches no registered variant")
    built = 0
    manifests: dict[str, dict] = {}
    for i, (kd, cfg, arch) in enumerate(todo, 1):
        arch_dir = out / arch
        arch_dir.mkdir(parents=True, exist_ok=True)
        manifest = manifests.setdefault(arch, load_manifest(arch_dir))
        key = kd.key(cfg)
        fp, modules = fingerprint(kd, cfg, arch, dsl_version)
        old = manifest["kernels"].get(key)
        tag = f"[{i}/{len(todo)}] {arch} {key}"
        if not force and old and old.get("fingerprint") == fp and (arch_dir / old["cubin"]).exists():
            log(f"{tag}: up to date")
            continue
        t0 = time.time()
        try:
            cubin, entry = compile_variant(kd, cfg, arch)
        except Exception as e:  # name the variant whatever went wrong inside the DSL
            raise CompileError(f"{tag}: compilation failed: {type(e).__name__}: {e}") from e
        entry["fingerprint"] = fp
        entry["sources"] = list(modules)
        entry["cubin"] = f"{key}.cubin"
        (arch_dir / entry["cubin"]).write_bytes(cubin)
        manifest["kernels"][key] = entry
        _write_manifest(arch_dir, manifest)
        built += 1
        log(f"{tag}: compiled in {time.time() - t0:.1f}s")
    return built


def list_variants(archs, only=None, out=print) -> None:
    """Print each arch's variant keys with their kernel's names (what ``--only`` accepts)."""
    for arch in archs:
        out(f"{arch}:")
        for kd, cfg, _ in registry.variants(arch, only):
            names = kd.name if kd.perf_name in (None, kd.name) else f"{kd.name}, {kd.perf_name}"
            out(f"  {kd.key(cfg):48s} ({names})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cute_mla.compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(registry.ARCHS), choices=registry.ARCHS, metavar="ARCH",
                   help=f"architectures to build, of {', '.join(registry.ARCHS)} (default: all of them)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="kernel names (as here or as `python -m perf --list` prints them) or variant keys "
                        "to build; see --list")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--list", action="store_true", help="print the variants per arch and exit")
    a = p.parse_args(argv)
    if a.list:
        list_variants(a.arch, a.only)
        return 0
    try:
        _dsl_version()
    except ImportError:
        print(f"error: compiling needs the CuTe DSL: pip install nvidia-cutlass-dsl=={DSL_PIN} (or, in a checkout, "
              "pip install -e '.[build]'); an installed cute-mla wheel already holds its cubins", file=sys.stderr)
        return 1
    t0 = time.time()
    try:
        n = build(a.arch, a.out, a.only, a.force, log=lambda s: print(s, flush=True))
    except CompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{n} variant(s) compiled in {time.time() - t0:.1f}s; cubins in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
