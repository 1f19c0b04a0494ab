"""Registry of benchmark cases.

A *case provider* is a function decorated with ``@register`` that yields ``BenchCase`` objects. Providers live in
the modules listed in ``PROVIDER_MODULES``; those are imported only when cases are asked for, so importing this
module (and ``python -m perf --list``) needs no GPU. Providers must not touch the GPU while yielding cases: all
device allocation belongs in ``make_inputs``.

Adding cases from a new module::

    # perf/bench_dense_decode.py
    from perf.cases import BenchCase, register

    @register
    def dense_decode_cases():
        for b in (64, 128):
            yield BenchCase(kernel="dense_decode", params={"b": b, "h_q": 128}, bound="compute",
                            flops=..., bytes=..., make_inputs=lambda b=b: _inputs(b), run=_run,
                            published={"value": 660, "unit": "TFLOPS", "device": "H800"})

and append ``"perf.bench_dense_decode"`` to ``PROVIDER_MODULES``.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

# Base kernel names; a case may add a suffix ("dense_decode_fp16") to tell variants apart.
KERNELS = ("combine", "scheduler", "dense_decode", "sparse_decode", "sparse_prefill",
           "mha_prefill_fwd", "mha_prefill_bwd", "host_overhead")
# "host": the case times the host, not the GPU (``perf.host_overhead``): its ``us`` is host
# microseconds per call of a tiny problem, with no roofline ratio
BOUNDS = ("compute", "memory", "host")
UNITS = ("TFLOPS", "GB/s")

# Modules that hold providers, imported lazily by all_cases(). Later work appends to this list.
PROVIDER_MODULES = ["perf.bench_foundation", "perf.bench_dense_decode", "perf.bench_sparse_prefill",
                    "perf.bench_sparse_decode", "perf.host_overhead"]

_SUFFIX = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")


def validate_kernel(kernel: str) -> str:
    """Return ``kernel`` if it is a known kernel name, optionally with a ``_suffix``; raise ValueError otherwise."""
    if not isinstance(kernel, str):
        raise ValueError(f"kernel must be a str, got {type(kernel).__name__}")
    for base in KERNELS:
        if kernel == base:
            return kernel
        if kernel.startswith(base + "_") and _SUFFIX.fullmatch(kernel[len(base) + 1:]):
            return kernel
    raise ValueError(f"unknown kernel {kernel!r}: expected one of {', '.join(KERNELS)}, "
                     f"optionally followed by a suffix such as '_fp16'")


@dataclass
class BenchCase:
    """One timed configuration of one kernel.

    flops / bytes are the *useful* work (SPEC.md section 6 formulas), not what the kernel happens to do, so that
    ratios compare like with like across implementations. ``make_inputs()`` builds one fresh input set on the
    GPU; ``run(inputs)`` launches the op once on the current stream without synchronising and returns its
    outputs (poisoning outputs, if wanted, is the case's job). ``rotate`` overrides how many input sets the
    timer cycles through.

    Side by side (``python -m perf --peer flashmla``): ``peer(ops, inputs)`` returns a zero-argument call
    of FlashMLA's op (``perf.peer``) on the same inputs, returning the outputs ``run`` returns, in order;
    ``compare`` names the ``cute_mla.testing.TOLERANCES`` kind of each output, to check that the two
    agree; ``graph`` times both sides inside CUDA graphs (decode, as engines run it) instead of eagerly.
    """
    kernel: str
    params: dict
    bound: str
    flops: float
    bytes: float
    make_inputs: Callable[[], object]
    run: Callable[[object], None]
    published: dict | None = None
    rotate: int | None = field(default=None, kw_only=True)
    peer: Callable[[object, object], Callable[[], tuple]] | None = field(default=None, kw_only=True)
    compare: tuple[str, ...] = field(default=(), kw_only=True)
    graph: bool = field(default=False, kw_only=True)

    def __post_init__(self):
        validate_kernel(self.kernel)
        if self.bound not in BOUNDS:
            raise ValueError(f"{self.kernel}: bound must be one of {BOUNDS}, got {self.bound!r}")
        if not isinstance(self.params, dict):
            raise ValueError(f"{self.kernel}: params must be a dict, got {type(self.params).__name__}")
        if self.flops < 0 or self.bytes < 0:
            raise ValueError(f"{self.kernel}: flops and bytes must be >= 0")
        if self.published is not None:
            p = self.published
            if not isinstance(p, dict) or not {"value", "unit"} <= p.keys() or p["unit"] not in UNITS:
                raise ValueError(f"{self.kernel}: published must be a dict with 'value' and 'unit' in {UNITS}, "
                                 f"got {p!r}")

    @property
    def name(self) -> str:
        """Human-readable label, also what --filter matches against (``case_label``)."""
        return case_label(self.kernel, self.params)


def case_label(kernel: str, params: dict) -> str:
    """A case's label in lists, reports and charts: 'dense_decode b=128 h_q=128'."""
    return " ".join([kernel] + [f"{k}={v}" for k, v in params.items()])


_PROVIDERS: list[Callable[[], Iterable[BenchCase]]] = []


def register(fn: Callable[[], Iterable[BenchCase]]) -> Callable[[], Iterable[BenchCase]]:
    """Decorator: add a case provider. Registering the same function twice (module re-import) is a no-op."""
    key = (fn.__module__, fn.__qualname__)
    if not any((p.__module__, p.__qualname__) == key for p in _PROVIDERS):
        _PROVIDERS.append(fn)
    return fn


def _matches(case: BenchCase, filters: list[str]) -> bool:
    return not filters or any(f in case.name for f in filters)


def iter_cases(filter: str | Iterable[str] | None = None, modules: Iterable[str] | None = None,
               errors: list[str] | None = None) -> Iterator[BenchCase]:
    """Yield registered cases whose name contains any of the filter substrings (all cases if none).

    A provider module that fails to import, or a provider that raises, must not hide every other case: the
    failure is appended to ``errors`` (if given) and skipped; without ``errors`` it is raised.
    """
    filters = [filter] if isinstance(filter, str) else list(filter or [])
    for mod in list(PROVIDER_MODULES) + [m for m in (modules or []) if m not in PROVIDER_MODULES]:
        try:
            importlib.import_module(mod)
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"import {mod}: {type(e).__name__}: {e}")
    for provider in list(_PROVIDERS):
        try:
            for case in provider():
                if _matches(case, filters):
                    yield case
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"provider {provider.__module__}.{provider.__qualname__}: {type(e).__name__}: {e}")


def all_cases(filter: str | Iterable[str] | None = None, modules: Iterable[str] | None = None,
              errors: list[str] | None = None) -> list[BenchCase]:
    """List form of iter_cases()."""
    return list(iter_cases(filter, modules, errors))
