"""perf.ncu's readers of Nsight Compute CSV dumps (no GPU: the dumps are written here)."""
from __future__ import annotations

import csv
import io

import pytest

from perf import ncu

HEADS = "kernel_cutlass_kernel_cute_mlakernelssm90sparse_decode_headsSparseDecodeHeadsSm90_object_at__tensorptr"
COMBINE = "kernel_cutlass_kernel_cute_mlakernelscommoncombineCombineKernel_object_at__tensorptrf32"
TORCH = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, float)"


def _csv(header, rows, preamble="==PROF== Connected to process 1234\n"):
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return preamble + buf.getvalue()


def test_kernel_names_map_to_the_registry_and_skip_torch():
    assert ncu.kernel_name(HEADS) == "sparse_decode_heads_sm90"
    assert ncu.kernel_name(HEADS.replace("sparse_decode_headsSparseDecodeHeadsSm90", "sparse_decodeSparseDecodeSm90")) \
        == "sparse_decode_sm90"
    assert ncu.kernel_name(COMBINE) == "combine"
    assert ncu.kernel_name(TORCH) is None
    assert ncu.kernel_name("void flash::flash_fwd_splitkv_mla_kernel<T>(Params)").startswith("flashmla:")


def test_durations_read_by_header_in_launch_order_and_units():
    header = ["ID", "Kernel Name", "Block Size", "Metric Name", "Metric Unit", "Metric Value"]
    rows = [["0", TORCH, "(128, 1, 1)", "gpu__time_duration.sum", "usecond", "3.10"],
            ["1", HEADS, "(256, 1, 1)", "gpu__time_duration.sum", "usecond", "1,234.50"],
            ["2", COMBINE, "(128, 1, 1)", "gpu__time_duration.sum", "nsecond", "4500"],
            ["3", HEADS, "(256, 1, 1)", "launch__grid_size", "", "132"]]
    assert ncu.durations(_csv(header, rows)) == [("sparse_decode_heads_sm90", 1234.5), ("combine", 4.5)]
    assert ncu.durations("==PROF== no kernels were profiled\n") == []


def test_details_pick_the_headline_figures_in_order():
    header = ["ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
    rows = [["0", HEADS, "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "31.02"],
            ["0", HEADS, "GPU Speed Of Light Throughput", "Duration", "usecond", "27.14"],
            ["0", HEADS, "Launch Statistics", "Registers Per Thread", "register/thread", "240"],
            ["0", HEADS, "Launch Statistics", "Some Other Figure", "", "7"]]
    assert ncu.details(_csv(header, rows)) == [("Duration", "27.14", "usecond"), ("DRAM Throughput", "31.02", "%"),
                                               ("Registers Per Thread", "240", "register/thread")]


def test_pipes_read_the_wide_and_the_long_raw_page():
    fp16 = "sm__inst_executed_pipe_fp16.avg.pct_of_peak_sustained_active"
    xu = "sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active"
    wide = _csv(["ID", "Kernel Name", fp16, xu, "dram__bytes.sum"],
                [["", "", "%", "%", "byte"], ["0", HEADS, "12.5", "81.25", "1,000"]])
    assert ncu.pipes(wide) == [(xu, 81.25), (fp16, 12.5)]
    long = _csv(["ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value"],
                [["0", HEADS, fp16, "%", "12.5"], ["0", HEADS, "sm__cycles_active.avg", "cycle", "9"],
                 ["0", HEADS, xu, "%", "81.25"]])
    assert ncu.pipes(long) == [(xu, 81.25), (fp16, 12.5)]


def test_stalls_split_by_the_setmaxnreg_markers():
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)"]
    rows = [["0x0", "S2R R0, SR_TID.X", "5", "4"],
            ["0x10", "USETMAXREG.DEALLOC.CTAPOOL 0xc0", "1", "1"],
            ["0x20", "LDG.E.128 R8, desc[UR4][R2.64]", "30", "30"],
            ["0x30", "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0", "2", "2"],
            ["0x40", "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], RZ", "62", "60"]]
    per_role, per_ins = ncu.stalls(_csv(header, rows, preamble='"Function Name: kernel_cutlass_kernel"\n'))
    assert per_role == {"set-up": 5.0, "producer": 31.0, "consumer": 64.0}
    top = sorted(per_ins, key=lambda x: -x[0])[0]
    assert top[1:3] == ("consumer", "0x40") and top[3].startswith("HGMMA")


def test_a_missing_column_names_what_was_there():
    with pytest.raises(KeyError, match="Warp Stall Sampling"):
        ncu.stalls(_csv(["Address", "Source", "Instructions Executed"], [["0x0", "NOP", "1"]], preamble=""))
    assert ncu.stalls(_csv(["Source", "Samples"], [["NOP", "1"]], preamble="")) == ({}, [])  # no header found


def test_stall_reasons_per_role_leave_the_not_issued_twins_out():
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_long_sb", "stall_wait",
              "stall_long_sb (Not Issued)"]
    rows = [["0x0", "S2R R0, SR_TID.X", "2", "0", "2", "0"],
            ["0x10", "USETMAXREG.DEALLOC.CTAPOOL 0x88", "0", "0", "0", "0"],
            ["0x20", "ISETP.GE.AND P2, PT, R29, RZ, PT", "50", "48", "2", "40"],
            ["0x30", "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8", "0", "0", "0", "0"],
            ["0x40", "NANOSLEEP.SYNCS 0x989680", "1,000", "990", "10", "900"]]
    reasons = ncu.stall_reasons(_csv(header, rows, preamble=""))
    assert reasons == {"set-up": {"long_sb": 0.0, "wait": 2.0}, "producer": {"long_sb": 48.0, "wait": 2.0},
                       "consumer": {"long_sb": 990.0, "wait": 10.0}}
    assert ncu.stall_reasons(_csv(["Source", "Samples"], [["NOP", "1"]], preamble="")) == {}
