"""python -m perf.ncu: Nsight Compute on one benchmark case, read back as short tables.

    python -m perf.ncu run CASE [--kernel REGEX] [--out DIR] [--calls N] [--peer]
    python -m perf.ncu durations DUR.csv
    python -m perf.ncu stalls SOURCE.csv [--top N]
    python -m perf.ncu details DETAILS.csv
    python -m perf.ncu pipes RAW.csv

``run`` (on the GPU machine) profiles ``python -m perf.run_once CASE`` twice: every kernel's
duration (``DIR/durations.csv``), then the first launch of the kernel matching REGEX with the
full section set and per-instruction source counters (``DIR/profile.ncu-rep``, its details page
``DIR/details.csv``, its raw metrics ``DIR/raw.csv`` and its SASS source page ``DIR/source.csv``),
and prints the durations, the details page's headline figures, the busiest pipes (a conversion
unit at its peak would show there) and the stall table.  The file names hold no '=' (the device
tool does not bring such names back).  ``durations``, ``details``, ``pipes`` and ``stalls`` read
those CSV files again, on any machine.

- durations: every launch of the case's kernels in order, our names for ours (``kernel_name``),
  then their total; input set-up kernels (torch's) are left out.
- stalls: the warp-stall samples of every SASS instruction, split by warp role: the code after
  ``USETMAXREG.DEALLOC`` is the producer's, after ``USETMAXREG.TRY_ALLOC`` the consumers' (the
  order ptxas lays the two branches out in), before either the common set-up; each role's
  stall reasons (long_sb, wait, ...) as shares of its samples.  Then the instructions with the
  most samples.  Session 19's attempt to read durations with awk split
  the quoted kernel names apart; these read the CSV by its header.

Clocks are left alone (``--clock-control none``), as the device's METHOD.md asks.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import subprocess
import sys
from pathlib import Path

# our kernels, as registry names, by a piece of their mangled names (first match wins)
OUR_KERNELS = (("sparse_decode_heads", "sparse_decode_heads_sm90"), ("SparseDecodeSm90", "sparse_decode_sm90"),
               ("DenseDecodeSm90", "dense_decode_sm90"), ("SparsePrefillSm90", "sparse_prefill_sm90"),
               ("CombineKernel", "combine"), ("DecodeScheduler", "decode_scheduler"))
UNITS_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}


def kernel_name(mangled: str) -> str | None:
    """Our registry name of a kernel, FlashMLA's kernels as "flashmla:<name>", None for others."""
    for piece, name in OUR_KERNELS:
        if piece in mangled:
            return name
    if "flash" in mangled.lower() or "mla" in mangled.lower():
        return "flashmla:" + re.sub(r"[<(].*", "", mangled)[-60:]
    return None


def _column(header: list[str], *pieces: str) -> str:
    for piece in pieces:
        for h in header:
            if piece.lower() in h.lower():
                return h
    raise KeyError(f"no column like {pieces} in {header}")


def _number(text: str) -> float:
    """A figure as ncu prints it (thousands separated by commas; empty for none)."""
    return float(text.replace(",", "") or 0)


def _metric_columns(header: list[str]) -> tuple[str, str, str]:
    """(name, value, unit) columns of a long-form table: a row a metric."""
    return _column(header, "Metric Name"), _column(header, "Metric Value"), _column(header, "Metric Unit")


def _rows(text: str, header_has: str) -> list[dict]:
    """The CSV table of an ncu text dump, from its header: the first quoted line that names
    ``header_has`` (ncu's own messages, and anything else before it, dropped)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"') and f'"{header_has}' in line),
                 len(lines))
    return list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))


def durations(text: str) -> list[tuple[str, float]]:
    """(kernel, us) of every profiled launch of ours or FlashMLA's, in launch order."""
    rows = _rows(text, "Metric Name")
    if not rows:
        return []
    header = list(rows[0])
    name_c = _column(header, "Kernel Name")
    metric_c, value_c, unit_c = _metric_columns(header)
    out = []
    for row in rows:
        name = kernel_name(row[name_c])
        if name is None or row[metric_c] != "gpu__time_duration.sum":
            continue
        out.append((name, _number(row[value_c]) * UNITS_US.get(row[unit_c], 1.0)))
    return out


# the details page's headline figures, as ncu names them (sections SpeedOfLight, LaunchStats,
# Occupancy, SchedulerStats, WarpStateStats, MemoryWorkloadAnalysis)
DETAILS = ("Duration", "Elapsed Cycles", "SM Frequency", "DRAM Throughput", "Memory Throughput",
           "Compute (SM) Throughput", "L2 Hit Rate", "L1/TEX Hit Rate", "Issue Slots Busy",
           "Issued Warp Per Scheduler", "No Eligible", "Warp Cycles Per Issued Instruction",
           "Registers Per Thread", "Dynamic Shared Memory Per Block", "Grid Size", "Achieved Occupancy")


def details(text: str) -> list[tuple[str, str, str]]:
    """(metric, value, unit) of the ``DETAILS`` figures on a details-page CSV, in that order (the
    first profiled kernel's)."""
    rows = _rows(text, "Metric Name")
    if not rows:
        return []
    metric_c, value_c, unit_c = _metric_columns(list(rows[0]))
    found: dict[str, tuple[str, str]] = {}
    for row in rows:
        found.setdefault(row[metric_c], (row[value_c], row[unit_c]))
    return [(m, *found[m]) for m in DETAILS if m in found]


PIPES = re.compile(r"^sm__(inst_executed_pipe|pipe)_\w+?\.avg\.pct_of_peak_sustained_active$")


def pipes(text: str) -> list[tuple[str, float]]:
    """(metric, % of peak) of every pipe-utilisation metric on a raw-page CSV, busiest first: the
    long form (a "Metric Name" column) or the wide one (a column a metric, a units row first)."""
    rows = _rows(text, "Kernel Name")
    if not rows:
        return []
    header = list(rows[0])
    if any("Metric Name" in h for h in header):
        metric_c, value_c, _ = _metric_columns(header)
        pairs = [(row[metric_c], row[value_c]) for row in rows]
    else:
        values = next((r for r in rows if any(re.fullmatch(r"[\d.,]+", v or "") for v in r.values())), {})
        pairs = list(values.items())
    out = {}
    for name, value in pairs:
        if name and PIPES.match(name) and name not in out:
            try:
                out[name] = float(str(value).replace(",", ""))  # an empty cell is no figure
            except ValueError:
                continue
    return sorted(out.items(), key=lambda kv: -kv[1])


def _by_role(rows: list[dict], src_c: str):
    """(role, row) of every SASS row: the code after ``USETMAXREG.DEALLOC`` is the producer's,
    after ``USETMAXREG.TRY_ALLOC`` the consumers', before either the set-up."""
    role = "set-up"
    for row in rows:
        ins = row[src_c].strip()
        if "USETMAXREG.DEALLOC" in ins:
            role = "producer"
        elif "USETMAXREG.TRY_ALLOC" in ins:
            role = "consumer"
        yield role, row


def stalls(text: str) -> tuple[dict[str, float], list[tuple[float, str, str, str]]]:
    """(samples per role, [(samples, role, address, instruction)] of every instruction)."""
    rows = _rows(text, "Address")
    if not rows:
        return {}, []
    header = list(rows[0])
    addr_c, src_c = _column(header, "Address"), _column(header, "Source")
    samples_c = _column(header, "Warp Stall Sampling (All", "Sampling")
    per_role, per_ins = {}, []
    for role, row in _by_role(rows, src_c):
        n = _number(row[samples_c])
        per_role[role] = per_role.get(role, 0.0) + n
        per_ins.append((n, role, row[addr_c], row[src_c].strip()))
    return per_role, per_ins


def stall_reasons(text: str) -> dict[str, dict[str, float]]:
    """Per role, the samples of each stall reason (the source page's ``stall_<reason>``
    columns, all samples; the "(Not Issued)" twins left out): where a role's warps wait, e.g.
    long_sb for a producer sitting out its gathers (perf/results/NOTES.md, session 23)."""
    rows = _rows(text, "Address")
    if not rows:
        return {}
    header = list(rows[0])
    src_c = _column(header, "Source")
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    out: dict[str, dict[str, float]] = {}
    for role, row in _by_role(rows, src_c):
        counts = out.setdefault(role, {})
        for h in reasons:
            name = h[len("stall_"):]
            counts[name] = counts.get(name, 0.0) + _number(row[h])
    return out


def print_durations(rows: list[tuple[str, float]]) -> None:
    for name, us in rows:
        print(f"{us:9.2f} us  {name}")
    total = sum(us for _, us in rows)
    print(f"{total:9.2f} us  all {len(rows)} launches")


def print_details(rows: list[tuple[str, str, str]]) -> None:
    for metric, value, unit in rows:
        print(f"{metric:>36}: {value} {unit}")


def print_pipes(rows: list[tuple[str, float]]) -> None:
    for metric, pct in rows:
        print(f"{pct:6.1f}%  {metric}")


def print_stalls(per_role: dict[str, float], per_ins: list, top: int, reasons: dict | None = None) -> None:
    total = sum(per_role.values()) or 1.0
    for role, n in per_role.items():
        print(f"{role:>9}: {n:10.0f} samples  {100 * n / total:5.1f}%")
        counts = (reasons or {}).get(role, {})
        own = sum(counts.values())
        if own:
            shares = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
            print(" " * 11 + ", ".join(f"{r} {100 * c / own:.0f}%" for r, c in shares if c))
    for n, role, addr, ins in sorted(per_ins, key=lambda x: -x[0])[:top]:
        print(f"{100 * n / total:5.1f}%  {role:>9}  {addr:>8}  {ins}")


def run(case: str, kernel: str, out: Path, calls: int, peer: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    ncu = ["ncu", "--clock-control", "none"]
    once = [sys.executable, "-m", "perf.run_once", case, str(calls), *(["--peer"] if peer else [])]
    dur = subprocess.run([*ncu, "--metrics", "gpu__time_duration.sum", "--csv", *once],
                         capture_output=True, text=True)
    (out / "durations.csv").write_text(dur.stdout)
    print_durations(durations(dur.stdout))
    rep = out / "profile.ncu-rep"
    prof = subprocess.run([*ncu, "-k", f"regex:{kernel}", "-c", "1", "--set", "full", "--import-source", "no",
                           "-f", "-o", str(rep.with_suffix("")), *once], capture_output=True, text=True)
    if prof.returncode != 0 or not rep.exists():
        print(prof.stdout[-2000:], prof.stderr[-2000:], file=sys.stderr)
        return 1
    for page, name, extra in (("details", "details.csv", []), ("raw", "raw.csv", []),
                              ("source", "source.csv", ["--print-source", "sass"])):
        res = subprocess.run(["ncu", "--import", str(rep), "--page", page, "--csv", *extra],
                             capture_output=True, text=True)
        (out / name).write_text(res.stdout)
    print_details(details((out / "details.csv").read_text()))
    print_pipes(pipes((out / "raw.csv").read_text())[:12])
    source = (out / "source.csv").read_text()
    per_role, per_ins = stalls(source)
    if not per_ins:  # a format this reader does not know: show it
        print("source.csv holds no table with an Address column; it begins:\n" + source[:800])
    print_stalls(per_role, per_ins, top=30, reasons=stall_reasons(source))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.ncu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="profile a case (GPU machine)")
    r.add_argument("case", help="a case name filter, as perf.run_once takes it")
    r.add_argument("--kernel", default="kernel_cutlass", help="regex of the kernel to profile in full")
    r.add_argument("--out", type=Path, default=Path("ncu-out"))
    r.add_argument("--calls", type=int, default=2, help="calls of the case (default 2)")
    r.add_argument("--peer", action="store_true",
                   help="FlashMLA's call too after each of ours (durations of both; --kernel may pick theirs)")
    d = sub.add_parser("durations", help="read a durations CSV")
    d.add_argument("csv", type=Path)
    t = sub.add_parser("details", help="read a details-page CSV")
    t.add_argument("csv", type=Path)
    q = sub.add_parser("pipes", help="read a raw-page CSV")
    q.add_argument("csv", type=Path)
    s = sub.add_parser("stalls", help="read a source-page CSV")
    s.add_argument("csv", type=Path)
    s.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    if args.cmd == "run":
        return run(args.case, args.kernel, args.out, args.calls, args.peer)
    text = args.csv.read_text()
    if args.cmd == "durations":
        print_durations(durations(text))
    elif args.cmd == "details":
        print_details(details(text))
    elif args.cmd == "pipes":
        print_pipes(pipes(text))
    else:
        print_stalls(*stalls(text), top=args.top, reasons=stall_reasons(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
