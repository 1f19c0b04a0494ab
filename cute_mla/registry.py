"""The one registry of compiled kernel variants (runtime code: no DSL import).

Each ``KernelDef`` names a CuTe DSL class, the architectures it builds for,
its static-config variants and its parameter ABI (from ``layouts.operands``).
``python -m cute_mla.compile`` builds every (kernel, variant, arch) from here,
and the launcher finds cubins by the same derived key, so a kernel is added by
writing its class and one entry below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from cute_mla.layouts import operands
from cute_mla.layouts.constants import (DENSE_DECODE_MAX_COLUMNS, DENSE_DECODE_SMALL_HEADS, DENSE_DECODE_TOKENS,
                                        SPARSE_DECODE_SMALL_HEADS)

ARCHS = ("sm_90a", "sm_100a")
# compute capability (major, minor) -> cubin architecture
ARCH_FOR_CC = {(9, 0): "sm_90a", (10, 0): "sm_100a", (10, 3): "sm_100a"}


@dataclass(frozen=True)
class KernelDef:
    name: str
    source: str  # "package.module:ClassName"
    archs: tuple[str, ...]
    args: Callable[..., tuple]  # config -> ABI spec tuple
    variants: tuple[Mapping[str, Any], ...] = ({},)
    # the name the perf harness reports it under (``perf.cases.KERNELS``), where it differs
    perf_name: str | None = None

    def abi(self, config: Mapping[str, Any]) -> tuple:
        return self.args(**config)

    def key(self, config: Mapping[str, Any]) -> str:
        return variant_key(self.name, config)


def variant_key(name: str, config: Mapping[str, Any]) -> str:
    """Derived compile key, e.g. ``combine__dtype-bf16``; never written by hand."""
    parts = [f"{k}-{config[k]}" for k in sorted(config)]
    return "__".join([name] + parts)


# sparse decode's matmul type (kernels.sm90.sparse_decode), both built for each cache format;
# ops.sparse_decode_matmul picks one per call
SPARSE_DECODE_MATMULS = ("f16", "bf16")
SPARSE_DECODE_MATMUL_ENV = "CUTE_MLA_SPARSE_DECODE_MATMUL"
# dense decode's row blocks a cluster (kernels.sm90.dense_decode), all built; plans.dense_cluster_rows
# picks one per plan
DENSE_CLUSTER_ROWS = (1, 2, 4)


KERNELS: tuple[KernelDef, ...] = (
    KernelDef(
        name="dense_decode_sm90",
        perf_name="dense_decode",
        source="cute_mla.kernels.sm90.dense_decode:DenseDecodeSm90",
        archs=("sm_90a",),
        args=operands.dense_decode_args,
        # cluster_rows n > 1: row blocks nk .. nk + n - 1 of a part run as one cluster and share each page
        variants=tuple({"dtype": d, "cluster_rows": c} for d in ("bf16", "fp16") for c in DENSE_CLUSTER_ROWS),
    ),
    KernelDef(
        name="sparse_prefill_sm90",
        perf_name="sparse_prefill",
        source="cute_mla.kernels.sm90.sparse_prefill:SparsePrefillSm90",
        archs=("sm_90a",),
        args=operands.sparse_prefill_args,
        variants=({"d_qk": 576}, {"d_qk": 512}),
    ),
    KernelDef(
        name="sparse_decode_sm90",
        perf_name="sparse_decode",
        source="cute_mla.kernels.sm90.sparse_decode:SparseDecodeSm90",
        archs=("sm_90a",),
        args=operands.sparse_decode_args,
        variants=tuple({"fmt": f, "matmul": m} for f in ("V32", "MODEL1") for m in SPARSE_DECODE_MATMULS),
    ),
    KernelDef(
        name="sparse_decode_heads_sm90",
        perf_name="sparse_decode",
        source="cute_mla.kernels.sm90.sparse_decode_heads:SparseDecodeHeadsSm90",
        archs=("sm_90a",),
        args=operands.sparse_decode_heads_args,
        variants=tuple({"fmt": f, "matmul": m, "heads": h} for f in ("V32", "MODEL1") for m in SPARSE_DECODE_MATMULS
                       for h in SPARSE_DECODE_SMALL_HEADS),
    ),
    KernelDef(
        name="dense_decode_heads_sm90",
        perf_name="dense_decode",
        source="cute_mla.kernels.sm90.dense_decode_heads:DenseDecodeHeadsSm90",
        archs=("sm_90a",),
        args=operands.dense_decode_heads_args,
        variants=tuple({"dtype": d, "heads": h, "tokens": t} for d in ("bf16", "fp16")
                       for h in DENSE_DECODE_SMALL_HEADS for t in DENSE_DECODE_TOKENS
                       if h * t <= DENSE_DECODE_MAX_COLUMNS),
    ),
    KernelDef(
        name="combine",
        source="cute_mla.kernels.common.combine:CombineKernel",
        archs=ARCHS,
        args=operands.combine_args,
        variants=tuple({"dtype": d, "columns": c} for d in ("bf16", "fp16") for c in (0, 1)),
    ),
    KernelDef(
        name="decode_scheduler",
        perf_name="scheduler",
        source="cute_mla.schedules.decode_scheduler:DecodeSchedulerKernel",
        archs=ARCHS,
        args=operands.decode_scheduler_args,
    ),
    # Tests the launcher's TMA descriptors end to end; no public op uses it.
    KernelDef(
        name="tma_probe",
        source="cute_mla.kernels.common.tma_probe:TmaProbeKernel",
        archs=ARCHS,
        args=operands.tma_probe_args,
    ),
    # Tests the paged-KV TMA view the decode kernels stream pages through.
    KernelDef(
        name="paged_kv_probe",
        source="cute_mla.kernels.common.tma_probe:PagedKvProbeKernel",
        archs=ARCHS,
        args=operands.paged_kv_probe_args,
        variants=({"dtype": "bf16", "d": 576},),
    ),
)

BY_NAME = {k.name: k for k in KERNELS}


def get(name: str) -> KernelDef:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no kernel named {name!r}; registered: {sorted(BY_NAME)}") from None


def variants(arch: str | None = None, only: Sequence[str] | None = None):
    """(KernelDef, config, arch) triples to build, filtered by arch and by name (the registry's
    or the perf harness's) or variant key."""
    for kd in KERNELS:
        for cfg in kd.variants:
            for a in kd.archs:
                if arch is not None and a != arch:
                    continue
                if only and not {kd.name, kd.perf_name, kd.key(cfg)} & set(only):
                    continue
                yield kd, dict(cfg), a
