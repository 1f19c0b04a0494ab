"""What a kernel variant's cubin is made from, derived from its imports (runtime code: stdlib only).

``import_closure(module)`` follows a kernel's module and every ``cute_mla`` module it imports,
transitively, by reading their source (nothing is imported but the packages on the way), so a
new helper module is in its kernels' fingerprints as soon as one of them imports it: no list of
dependencies is kept by hand.  ``fingerprint`` hashes those sources with the variant's ABI,
config, arch and DSL version.  ``python -m cute_mla.compile`` records both in the manifest; the
launcher recomputes the fingerprint from the sources beside the cubins (a checkout or an
installed wheel: the same module names, the same bytes) and refuses cubins that do not match.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

PACKAGE = "cute_mla"
# modules the compile step builds every kernel with, besides the kernel's own imports
BUILD_MODULES = ("cute_mla.kernels.common.fake",)


def _path(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is not a package
        return False


@lru_cache(maxsize=None)
def direct_imports(module: str) -> tuple[str, ...]:
    """The ``cute_mla`` modules ``module`` imports by absolute name (``from a.b import c`` is
    module ``a.b.c`` when that is a module, else ``a.b``)."""
    tree = ast.parse(_path(module).read_bytes(), filename=module)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if _is_module(sub) else node.module)
    return tuple(sorted(m for m in found if m.startswith(PACKAGE + ".") and _path(m) is not None))


def import_closure(module: str) -> tuple[str, ...]:
    """``module`` and every ``cute_mla`` module it reaches through imports, sorted."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(direct_imports(m))
    return tuple(sorted(seen))


def variant_modules(source: str) -> tuple[str, ...]:
    """The modules a kernel class ``"package.module:Class"`` is built from."""
    closure = set(import_closure(source.split(":")[0]))
    for m in BUILD_MODULES:
        closure.update(import_closure(m))
    return tuple(sorted(closure))


@lru_cache(maxsize=None)
def _file_digest(module: str) -> bytes:
    return hashlib.sha256(_path(module).read_bytes()).digest()


def fingerprint(source: str, abi_spec: tuple, config: dict, arch: str, dsl_version: str,
                modules: tuple[str, ...]) -> str:
    """Hash of everything that decides a cubin: the sources of ``modules`` (by module name),
    the ABI, the kernel class and config, the arch and the DSL version."""
    h = hashlib.sha256()
    for m in sorted(modules):
        h.update(m.encode())
        h.update(_file_digest(m))
    h.update(repr(abi_spec).encode())
    h.update(json.dumps([source, config, arch, dsl_version], sort_keys=True).encode())
    return h.hexdigest()[:16]
