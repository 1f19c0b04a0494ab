"""Compile-only tests (CPU, run in CI): every variant builds for every arch it is
registered for, the PTX ABI matches layouts.operands, SASS has what we intended."""
import json
import re
from pathlib import Path

import pytest

from cute_mla import compile as cm, registry
from cute_mla.layouts import abi
from perf import sass as perf_sass

pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl (the build extra) is not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("cubins")
    n = cm.build(registry.ARCHS, out, log=lambda s: None)
    assert n == len(list(registry.variants()))
    return out


def test_every_variant_builds_with_matching_abi(built):
    for kd, cfg, arch in registry.variants():
        entry = json.loads((built / arch / "manifest.json").read_text())["kernels"][kd.key(cfg)]
        assert (built / arch / entry["cubin"]).stat().st_size > 0
        assert entry["params"] == abi.param_layout(kd.abi(cfg))
        assert entry["dsl_version"] == cm.DSL_PIN
        assert entry["block"][0] > 0 and entry["smem_bytes"] >= 0


def test_unchanged_variants_are_skipped(built):
    log = []
    assert cm.build(registry.ARCHS, built, log=log.append) == 0
    assert all("up to date" in line for line in log)


def test_only_filters_and_unknown_name_fails(built, tmp_path):
    assert cm.build(["sm_90a"], tmp_path, only=["decode_scheduler"], log=lambda s: None) == 1
    with pytest.raises(cm.CompileError, match="no_such_kernel"):
        cm.build(["sm_90a"], tmp_path, only=["no_such_kernel"], log=lambda s: None)


def test_failure_names_the_variant(tmp_path, monkeypatch):
    broken = registry.KernelDef(name="broken", source="cute_mla.kernels.common.combine:CombineKernel",
                                archs=("sm_90a",), args=lambda: registry.operands.decode_scheduler_args(),
                                variants=({},))
    monkeypatch.setattr(registry, "KERNELS", (broken,))
    with pytest.raises(cm.CompileError, match=r"sm_90a broken"):
        cm.build(["sm_90a"], tmp_path, log=lambda s: None)


def test_ptx_abi_mismatch_is_caught():
    spec = registry.get("decode_scheduler").abi({})
    expected = abi.param_layout(spec)
    wrong = [dict(p) for p in expected]
    wrong[0]["size"] += 8
    with pytest.raises(cm.CompileError, match="do not match"):
        cm.check_abi("decode_scheduler", expected, wrong)


def sass(cubin: Path) -> str:
    if perf_sass.cuobjdump() is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    return perf_sass.dump(cubin)


# What each sm_90a kernel's SASS must (and must not) contain.
SASS_EXPECT = {
    # 16-byte loads of the partial rows; ACQBULK is griddepcontrol.wait (PDL)
    "combine": (["LDG.E.128", "ACQBULK"], ["LDL", "STL"]),
    "decode_scheduler": (["SHFL.BFLY", "STG.E"], ["LDL", "STL"]),
    # bulk tensor copy (TMA) completing on an mbarrier
    "tma_probe": (["UTMALDG", "SYNCS"], ["LDL", "STL"]),
    "paged_kv_probe": (["UTMALDG", "SYNCS"], ["LDL", "STL"]),
    # seesaw: S = Q K^T as one 64x64 GEMM per warpgroup, O += P V with the own P from
    # registers (RS form: a register A operand before the B descriptor) and the other
    # warpgroup's P from smem, V transposed from the same K pages, pages by 4-D TMA;
    # no producer warpgroup, so no register reallocation; tickets and split counts by GPU-scope
    # atomics, the counts polled by acquire loads after a release fence (split_tickets);
    # finished O rows leave 16 bytes a lane after a quad exchange (fragment_store); P handed to
    # the other warpgroup by stmatrix, converted to bf16 a pair at a time (no F2F.BF16)
    "dense_decode_sm90": (["STG.E.128", "SHFL.BFLY", "STSM.16.M88.4", "HGMMA.64x64x16.F32",
                           r"re:HGMMA\.64x256x16\.F32\S* R\d+, R\d+, gdesc",
                           r"re:HGMMA\.64x256x16\.F32\S* R\d+, gdesc", "tnspB", "UTMALDG.4D",
                           "ATOMG.E.ADD.STRONG.GPU", "REDG.E.ADD.S32.STRONG.GPU", "LDG.E.STRONG.GPU",
                           "MEMBAR.ALL.GPU"],
                          ["LDL", "STL", "USETMAXREG", "F2F.BF16.F32"]),
    # the seesaw's MMAs as in dense decode; kv rows gathered by 16-byte zero-filling
    # cp.async that bypass L1, each half-block's copies completing on an mbarrier; O rows
    # stored 16 bytes a lane (fragment_store); P by stmatrix, as dense decode
    "sparse_prefill_sm90": (["STG.E.128", "STSM.16.M88.4", "HGMMA.64x64x16.F32",
                             r"re:HGMMA\.64x256x16\.F32\S* R\d+, R\d+, gdesc",
                             r"re:HGMMA\.64x256x16\.F32\S* R\d+, gdesc", "tnspB", "LDGSTS.E.BYPASS.LTC256B.128",
                             "ARRIVES.LDGSTSBAR", "USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC"],
                            ["LDL", "STL", "F2F.BF16.F32"]),
    # the same consumer MMAs (64x32 S per warpgroup, 64x256 O), FP8 codes -> f16 pairs in
    # hardware, bf16 RoPE by cp.async, bf16 output 16 bytes a lane, P by stmatrix; then per matmul
    # type (below)
    "sparse_decode_sm90": (["STG.E.128", "tnspB", "STSM.16.M88.4", "F2FP.F16.E4M3.UNPACK_B", "F2FP.BF16.F32.PACK_AB",
                            "LDG.E.128", "LDGSTS.E.BYPASS.128", "USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC"], ["LDL", "STL"]),
    # heads on N, dense: the same consumer; whole pages by TMA (4-D, the paged view) from one
    # producer warp; tail rows' V zeroed by 16-byte shared stores
    "dense_decode_heads_sm90": ([r"re:HGMMA\.64x(8|16|32)x16\.F32", "tnspA", "UTMALDG.4D", "STS.128",
                                 "USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC"],
                                ["LDL", "STL", "HGMMA.64x256x16", "F2FP.F16.E4M3"]),
    # heads on N: S^T = K Q^T as 64 x h_q MMAs, O^T = V^T P^T with V^T an MN-major A operand
    # (tnspA), the same producer
    "sparse_decode_heads_sm90": ([r"re:HGMMA\.64x(8|16)x16\.F32", "tnspA", "F2FP.F16.E4M3.UNPACK_B",
                                  "LDGSTS.E.BYPASS.128", "USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC"],
                                 ["LDL", "STL", "HGMMA.64x256x16"]),
}
# What one variant flag adds, (kernel, flag) -> value -> (must, must not):
SASS_EXPECT_VARIANT = {
    # sparse decode by ``matmul``: f16 MMAs (no .BF16 suffix; V32 adds bf16 ones for RoPE) and
    # the f16 scale applied by HMUL2; or bf16 MMAs only and the scale applied in f32
    ("sparse_decode_sm90", "matmul"): {
        "f16": ([r"re:HGMMA\.64x32x16\.F32 ", r"re:HGMMA\.64x256x16\.F32 ", "HMUL2"], ["HGMMA.64x256x16.F32.BF16"]),
        "bf16": (["HGMMA.64x32x16.F32.BF16", "HGMMA.64x256x16.F32.BF16", "FMUL"],
                 [r"re:HGMMA\.64x\d+x16\.F32 ", "HMUL2"]),
    },
    # dense decode in clusters: pages by multicast TMA, the other CTAs told by remote mbarrier
    # arrives, tickets handed out at a cluster barrier; without: none of these
    ("dense_decode_sm90", "cluster_rows"): {
        1: ([], ["MULTICAST", "UCGABAR", "SYNCS.ARRIVE.TRANS64.RED"]),
        **{n: (["UTMALDG.4D.MULTICAST", "SYNCS.ARRIVE.TRANS64.RED", "UCGABAR_ARV", "UCGABAR_WAIT"], [])
           for n in (2, 4)},
    },
}


# Variants allowed a few spilled words: kernel -> (variant -> most LDL + STL instructions).
# Dense small heads at 32 columns (h_q x tokens; O^T is 128 floats a thread): 5-7 when added
# (session 29), none in the block loop: words stored before the consumer's piece loop and read
# once a piece (the epilogue's split row), one producer word read once a piece.
SASS_LOCAL_BUDGET = {"dense_decode_heads_sm90": lambda cfg: 8 if cfg["heads"] * cfg["tokens"] == 32 else 0}


def local_budget(kd, cfg) -> int:
    """How many local-memory instructions variant ``cfg`` of ``kd`` may have (0 for most)."""
    budget = SASS_LOCAL_BUDGET.get(kd.name)
    return budget(cfg) if budget else 0


def _found(ins: str, text: str) -> bool:
    """``ins`` is a substring of ``text``, or after "re:" a regular expression found in it."""
    return bool(re.search(ins[3:], text)) if ins.startswith("re:") else ins in text


@pytest.mark.parametrize("kd,cfg", [(kd, cfg) for kd in registry.KERNELS for cfg in kd.variants
                                    if "sm_90a" in kd.archs],
                         ids=lambda x: getattr(x, "name", None) or str(x))
def test_sm90_sass_has_intended_instructions(built, kd, cfg):
    entry = json.loads((built / "sm_90a" / "manifest.json").read_text())["kernels"][kd.key(cfg)]
    text = sass(built / "sm_90a" / entry["cubin"])
    must, must_not = SASS_EXPECT[kd.name]
    for (name, flag), by_value in SASS_EXPECT_VARIANT.items():
        if name == kd.name:
            extra_must, extra_must_not = by_value[cfg[flag]]
            must, must_not = must + extra_must, must_not + extra_must_not
    for ins in must:  # a substring, or a regular expression after "re:"
        assert _found(ins, text), f"{kd.key(cfg)}: expected {ins} in SASS"
    budget = local_budget(kd, cfg)
    if budget:
        must_not = [ins for ins in must_not if ins not in ("LDL", "STL")]
        spills = len(re.findall(r"\b(LDL|STL)\b", text))
        assert spills <= budget, f"{kd.key(cfg)}: {spills} local-memory instructions, at most {budget} expected"
    for ins in must_not:
        assert not _found(ins, text), f"{kd.key(cfg)}: unexpected {ins} in SASS"
    # ptxas serialises every WGMMA of a kernel when one chain is left in flight across a
    # branch (C7520), silently: each HGMMA is then followed by its own wait.
    mmas, waits = text.count("HGMMA"), text.count("WARPGROUP.DEPBAR")
    assert waits * 4 <= mmas, f"{kd.key(cfg)}: {waits} WGMMA waits for {mmas} WGMMAs (serialised by ptxas?)"


def test_sass_control_bits_decode_consistently(built):
    """perf.sass reads each instruction's scheduling bits: every register-destination global
    load signals one of the six scoreboards, and every scoreboard an instruction waits on is signalled by
    some instruction of the kernel (bits read from the wrong place would break both)."""
    for cubin in sorted((built / "sm_90a").glob("*.cubin")):
        instructions = perf_sass.parse(sass(cubin))
        assert instructions, cubin.name
        loads = perf_sass.load_scoreboards(instructions)
        assert set(loads) <= set(range(6)), f"{cubin.name}: global loads on scoreboards {dict(loads)}"
        signalled = {i.write_sb for i in instructions} | {i.read_sb for i in instructions}
        for ins in instructions:
            for sb in range(6):
                assert not ins.waits_on(sb) or sb in signalled, f"{cubin.name}: {ins} waits on unused {sb}"

