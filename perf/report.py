"""Turn timings into the results files: <stamp>_<device-slug>.json, .md and .png.

The JSON shape is a contract read by other tooling; see build_report(). Per-case keys beyond the required ones
are allowed (published, published_ratio, us_p10, ...); top-level keys are exactly the listed ones.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from perf.cases import case_label

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
UNIT_KEY = {"TFLOPS": "tflops", "GB/s": "gbs"}


def case_entry(kernel: str, params: dict, bound: str, flops: float, bytes: float, us: float | None,
               roofline: dict, published: dict | None = None, error: str | None = None, **extra) -> dict:
    """One element of report["cases"]. ``us`` None (with ``error``) marks a failed case: rates and ratio null."""
    ok = us is not None and us > 0 and error is None
    tflops = flops / us / 1e6 if ok else None
    gbs = bytes / us / 1e3 if ok else None
    ceiling = {"compute": roofline.get("gemm_tflops"), "memory": roofline.get("copy_gbs")}.get(bound)
    ours = tflops if bound == "compute" else gbs
    ratio = ours / ceiling if ours is not None and ceiling else None
    e = {"kernel": kernel, "params": dict(params), "us": us if ok else None, "tflops": tflops, "gbs": gbs,
         "ratio": ratio, "bound": bound}
    if published is not None:
        e["published"] = dict(published)
        mine = e.get(UNIT_KEY.get(published.get("unit"), ""))
        e["published_ratio"] = mine / published["value"] if mine is not None and published.get("value") else None
    if error is not None:
        e["error"] = error
    e.update(extra)
    return e


def build_report(cases: list[dict], roofline: dict, device: str, commit: str, date: str | None = None) -> dict:
    date = date or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"device": device, "commit": commit, "date": date,
            "roofline": {"copy_gbs": roofline["copy_gbs"], "gemm_tflops": roofline["gemm_tflops"]},
            "cases": cases}


def git_commit(override: str | None = None) -> str:
    """--commit, else $CUTE_MLA_COMMIT, else `git rev-parse --short HEAD` (+ "-dirty"), else "unknown".

    The GPU machine gets a copy of the tree that may have no .git, so the caller can pass the commit in.
    """
    if override:
        return override
    if os.environ.get("CUTE_MLA_COMMIT"):
        return os.environ["CUTE_MLA_COMMIT"]
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        head = git("rev-parse", "--short", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _fmt(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _published(e: dict) -> str:
    p = e.get("published")
    if not p:
        return "-"
    s = f"{p['value']:g} {p['unit']}" + (f" ({p['device']})" if p.get("device") else "")
    return s + (f", ours x{e['published_ratio']:.2f}" if e.get("published_ratio") is not None else "")


def _speedup(e: dict) -> str:
    if e.get("speedup") is None:
        return "-"
    return f"x{e['speedup']:.2f} ({e['peer_us']:.1f} us)" + ("" if e.get("agree", True) else " differs")


def markdown(report: dict) -> str:
    r = report["roofline"]
    lines = [f"# cute-mla perf: {report['device']}", "",
             f"- commit: `{report['commit']}`", f"- date: {report['date']}",
             f"- roofline: copy {r['copy_gbs']:.1f} GB/s (read + write), bf16 GEMM {r['gemm_tflops']:.1f} TFLOPS",
             "- ratio: TFLOPS / GEMM rate for compute-bound cases, GB/s / copy bandwidth for memory-bound ones",
             "- host_overhead: us = host microseconds per eager call (median); peer_us = FlashMLA's, same run",
             "- vs FlashMLA: speedup = FlashMLA us / cute-mla us on the same inputs in the same run (--peer); "
             "'differs' marks outputs outside SPEC's tolerance of each other", "",
             "| kernel | params | us | TFLOPS | GB/s | bound | ratio | vs FlashMLA | FlashMLA published |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    for e in report["cases"]:
        params = " ".join(f"{k}={v}" for k, v in e["params"].items())
        if e.get("peer_us") is not None and e.get("speedup") is None:
            params += f" (FlashMLA {e['peer_us']:.1f} us)"
        if e.get("cold_us") is not None:
            params += f" (first call {e['cold_us']:.0f} us)"
        us = "ERROR" if e.get("error") else _fmt(e["us"], 2)
        lines.append(f"| {_cell(e['kernel'])} | {_cell(params)} | {us} | {_fmt(e['tflops'], 1)} | "
                     f"{_fmt(e['gbs'], 1)} | {e['bound']} | {_fmt(e['ratio'], 3)} | {_speedup(e)} | "
                     f"{_cell(_published(e))} |")
    errors = [e for e in report["cases"] if e.get("error")]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {e['kernel']} {e['params']}: {_cell(e['error'])}" for e in errors]
    return "\n".join(lines) + "\n"


def write_png(report: dict, path: Path) -> bool:
    """Bar chart of ratio to roofline per case. Returns False (with a warning) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")   # no display on the GPU machine
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib not installed; skipping the PNG chart", file=sys.stderr)
        return False
    cases = report["cases"]
    labels = [case_label(e["kernel"], e["params"]) for e in cases]
    ratios = [e["ratio"] or 0.0 for e in cases]   # failed cases show as an empty bar, marked below
    colors = ["tab:red" if e.get("error") else "tab:blue" if e["bound"] == "compute" else "tab:orange"
              for e in cases]
    speedups = [e.get("speedup") for e in cases]
    panels = 2 if any(x is not None for x in speedups) else 1
    fig, axes = plt.subplots(1, panels, figsize=(10 + 4 * (panels - 1), 1.5 + 0.35 * max(1, len(cases))),
                             sharey=True, squeeze=False)
    ax = axes[0][0]
    ax.barh(range(len(cases)), ratios, color=colors)
    for i, e in enumerate(cases):
        if e.get("error"):
            ax.text(0.01, i, "error", va="center", color="tab:red")
    ax.set_yticks(range(len(cases)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("ratio to measured roofline (blue: GEMM TFLOPS, orange: copy GB/s)")
    ax.set_title(f"{report['device']} @ {report['commit']}  {report['date']}", fontsize=9)
    if panels == 2:  # speedup against FlashMLA, same run (--peer); red: outputs differ
        sx = axes[0][1]
        sx.barh(range(len(cases)), [x or 0.0 for x in speedups],
                color=["tab:red" if not e.get("agree", True) else "tab:green" for e in cases])
        sx.axvline(1.0, color="gray", linestyle="--", linewidth=1)
        sx.axvline(1.05, color="gray", linestyle=":", linewidth=1)
        sx.set_xlabel("speedup vs FlashMLA (its us / ours)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict, out_dir: str | Path = DEFAULT_OUT, png: bool = True,
                 stamp: str | None = None) -> dict:
    """Write <stamp>_<device-slug>.{json,md,png}; return {"json": path, "md": path, "png": path or None}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = out / f"{stamp}_{slug(report['device'])}"
    paths = {"json": stem.with_suffix(".json"), "md": stem.with_suffix(".md"), "png": None}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    if png and write_png(report, stem.with_suffix(".png")):
        paths["png"] = stem.with_suffix(".png")
    return paths
