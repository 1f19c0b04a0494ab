"""CPU tests of the perf harness plumbing: report shape and maths, case registry, CLI without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perf import cases as registry
from perf import report

REPO = Path(__file__).resolve().parent.parent
ROOF = {"copy_gbs": 3000.0, "gemm_tflops": 800.0}
PUB = {"value": 660, "unit": "TFLOPS", "device": "H800"}


def _fake_entries():
    return [
        report.case_entry("dense_decode", {"b": 128, "h_q": 128, "s_q": 1}, "compute", flops=4.0e12, bytes=2.0e9,
                          us=10_000.0, roofline=ROOF, published=PUB, us_p10=9_900.0),
        report.case_entry("combine", {"b": 64, "splits": 8}, "memory", flops=1.0e6, bytes=3.0e8, us=200.0,
                          roofline=ROOF, published={"value": 3000, "unit": "GB/s"}),
        report.case_entry("sparse_prefill", {"s_q": 4096}, "compute", flops=1e12, bytes=1e9, us=None,
                          roofline=ROOF, error="RuntimeError: boom | bad\nsecond line"),
    ]


def _write(tmp_path, png=False):
    rep = report.build_report(_fake_entries(), ROOF, "NVIDIA H100 80GB HBM3", "abc1234", "2026-01-01T00:00:00+00:00")
    return rep, report.write_report(rep, tmp_path, png=png, stamp="20260101-000000")


def test_json_shape_and_ratios(tmp_path):
    _, paths = _write(tmp_path)
    assert paths["json"].name == "20260101-000000_nvidia-h100-80gb-hbm3.json"
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"device", "commit", "date", "roofline", "cases"}
    assert set(data["roofline"]) == {"copy_gbs", "gemm_tflops"}
    assert (data["device"], data["commit"]) == ("NVIDIA H100 80GB HBM3", "abc1234")
    required = {"kernel", "params", "us", "tflops", "gbs", "ratio", "bound"}
    for c in data["cases"]:
        assert required <= set(c)

    dd, comb, bad = data["cases"]
    # dense decode: 4e12 FLOP in 10 ms = 400 TFLOPS; compute-bound -> ratio to the 800 TFLOPS GEMM rate.
    assert dd["tflops"] == pytest.approx(400.0) and dd["gbs"] == pytest.approx(200.0)
    assert dd["ratio"] == pytest.approx(0.5) and dd["bound"] == "compute"
    assert dd["published_ratio"] == pytest.approx(400 / 660) and dd["published"] == PUB
    assert dd["params"] == {"b": 128, "h_q": 128, "s_q": 1} and dd["us_p10"] == 9_900.0
    # combine: 3e8 B in 200 us = 1500 GB/s; memory-bound -> ratio to the 3000 GB/s copy rate.
    assert comb["gbs"] == pytest.approx(1500.0) and comb["ratio"] == pytest.approx(0.5)
    assert comb["published_ratio"] == pytest.approx(0.5)
    # failed case: error kept, no numbers.
    assert bad["error"].startswith("RuntimeError") and bad["ratio"] is None
    assert bad["us"] is None and bad["tflops"] is None and bad["gbs"] is None


def test_markdown_row_per_case(tmp_path):
    rep, paths = _write(tmp_path)
    md = paths["md"].read_text()
    assert md == report.markdown(rep)
    rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith(("| kernel", "| ---"))]
    assert len(rows) == 3
    assert rows[0].startswith("| dense_decode | b=128 h_q=128 s_q=1 | 10000.00 | 400.0 |")
    assert "660 TFLOPS (H800)" in rows[0]
    assert "ERROR" in rows[2] and rows[2].count(" | ") == 8   # the '|' in the error text is escaped away
    assert "abc1234" in md and "3000.0 GB/s" in md and "800.0 TFLOPS" in md


def test_side_by_side_speedup_in_markdown_and_png(tmp_path):
    """--peer entries: the speedup column shows FlashMLA us / ours, and outputs that differ are flagged."""
    cases = [report.case_entry("dense_decode", {"b": 5}, "memory", flops=1.0, bytes=1e6, us=20.0, roofline=ROOF,
                               peer_us=25.0, speedup=1.25, agree=True),
             report.case_entry("sparse_prefill", {"s_q": 70000}, "compute", flops=1e12, bytes=1e9, us=100.0,
                               roofline=ROOF, peer_us=80.0, speedup=0.8, agree=False)]
    rep = report.build_report(cases, ROOF, "NVIDIA H200", "abc1234", "2026-01-01T00:00:00+00:00")
    rows = [l for l in report.markdown(rep).splitlines() if l.startswith(("| dense", "| sparse"))]
    assert "x1.25 (25.0 us)" in rows[0] and "differs" not in rows[0]
    assert "x0.80 (80.0 us) differs" in rows[1]
    if pytest.importorskip("matplotlib"):
        paths = report.write_report(rep, tmp_path, png=True, stamp="20260101-000000")
        assert paths["png"].stat().st_size > 1000


def test_png_written(tmp_path):
    pytest.importorskip("matplotlib")
    _, paths = _write(tmp_path, png=True)
    assert paths["png"] is not None and paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_commit_override(monkeypatch):
    assert report.git_commit("deadbee") == "deadbee"
    monkeypatch.setenv("CUTE_MLA_COMMIT", "cafe123")
    assert report.git_commit() == "cafe123"
    monkeypatch.delenv("CUTE_MLA_COMMIT")
    assert isinstance(report.git_commit(), str) and report.git_commit()


def _case(kernel="combine", **kw):
    kw = {"params": {"b": 1}, "bound": "memory", "flops": 0.0, "bytes": 1.0,
          "make_inputs": lambda: None, "run": lambda x: None, **kw}
    return registry.BenchCase(kernel, **kw)


@pytest.mark.parametrize("name", ["combine", "scheduler", "dense_decode", "dense_decode_fp16", "sparse_decode",
                                  "sparse_prefill", "mha_prefill_fwd", "mha_prefill_bwd", "sparse_decode_model1"])
def test_kernel_names_accepted(name):
    assert _case(name).kernel == name


@pytest.mark.parametrize("name", ["foo", "", "dense", "dense_decodex", "dense_decode_", "Dense_decode",
                                  "mha_prefill", "combine-fp16"])
def test_kernel_names_rejected(name):
    with pytest.raises(ValueError, match="kernel"):
        _case(name)


def test_case_validation():
    with pytest.raises(ValueError, match="bound"):
        _case(bound="latency")
    with pytest.raises(ValueError, match="published"):
        _case(published={"value": 1, "unit": "furlongs"})


def test_registry_filter_and_errors(monkeypatch):
    monkeypatch.setattr(registry, "_PROVIDERS", [])
    monkeypatch.setattr(registry, "PROVIDER_MODULES", [])

    @registry.register
    def provider():
        yield _case("combine", params={"b": 8})
        yield _case("dense_decode", params={"b": 128}, bound="compute")

    registry.register(provider)   # re-registration is a no-op
    assert [c.name for c in registry.all_cases()] == ["combine b=8", "dense_decode b=128"]
    assert [c.name for c in registry.all_cases("b=128")] == ["dense_decode b=128"]
    assert len(registry.all_cases(["combine", "dense"])) == 2
    assert registry.all_cases("nothing") == []

    errors = []
    assert len(registry.all_cases(modules=["perf.no_such_module"], errors=errors)) == 2
    assert len(errors) == 1 and "no_such_module" in errors[0]
    with pytest.raises(ImportError):
        registry.all_cases(modules=["perf.no_such_module"])


def _cli(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # behave as "no GPU" even on the GPU machine
    return subprocess.run([sys.executable, "-m", "perf", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_list_without_gpu():
    r = _cli("--list")
    assert r.returncode == 0, r.stderr
    assert "case(s)" in r.stderr


def test_cli_run_without_gpu_fails_clearly(tmp_path):
    r = _cli("--out", str(tmp_path))
    assert r.returncode != 0
    assert "needs a CUDA GPU" in r.stderr
    assert not list(tmp_path.iterdir())


def test_side_by_side_rounds_summary():
    """--peer --rounds: medians over rounds and each round's speedup range."""
    from perf.__main__ import rounds_summary
    from perf.timing import Timing

    ours = [Timing(100.0, 95.0, 110.0, 50, 1), Timing(120.0, 110.0, 130.0, 50, 1), Timing(105.0, 100.0, 112.0, 50, 1)]
    peer = [Timing(110.0, 100.0, 120.0, 50, 1)] * 3
    r = rounds_summary(ours, peer)
    assert r["us"] == 105.0 and r["peer_us"] == 110.0 and r["speedup"] == pytest.approx(110 / 105)
    assert r["speedup_min"] == pytest.approx(110 / 120) and r["speedup_max"] == pytest.approx(1.1)
    assert r["rounds"] == 3 and r["us_rounds"] == [100.0, 120.0, 105.0]


def test_host_us_interleaved_times_every_call_in_turns():
    from perf import host_overhead

    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    res = host_overhead.host_us_interleaved(calls, rounds=3, per_round=4, warmup=2, sync=lambda: None)
    assert set(res) == {"a", "b"} and all(med >= 0 and p10 <= p90 for med, p10, p90 in res.values())
    timed = order[4:]  # after the warm-up: a x4, b x4, three times
    assert timed == (["a"] * 4 + ["b"] * 4) * 3
