"""python -m perf.ab: time two source trees (a change and its base) case by case, in alternating order.

    python -m perf.ab NEW_TREE OLD_TREE [--filter SUBSTR ...] [--rounds N] [--out DIR] [--peer flashmla[=PATH]]
                      [--new-commit ID] [--new-env NAME=VALUE ...] [--old-env NAME=VALUE ...]

Each tree is a checkout with its cubins built (``python -m cute_mla.compile`` there).  Every round runs
``python -m perf`` once in each tree, as a separate process with that tree on PYTHONPATH; the order
alternates between rounds (new first, then old first, ...), because the order alone moved one A/B by a
few percent: session 15's dense grid A/B ran the new tree first three times, and a case the change
could not affect read 0.94-0.99 each time (perf/results/NOTES.md).  Then, per case, the ratio
old_us / new_us of every round, its median and range: above 1 the new tree is faster.

``--new-env`` / ``--old-env`` set environment variables for one side's runs only, so a runtime
switch can be timed inside one tree: ``python -m perf.ab T T --old-env CUTE_MLA_DENSE_CLUSTER_ROWS=1``
times dense decode's clusters (new) against none (old), the same cubins on both sides.

The rounds' reports stay in OUT/new-<i> and OUT/old-<i>, each run's output in OUT/new-<i>.log
and OUT/old-<i>.log; OUT/ab.json holds the comparison.  (The runs write to their logs, not to
this process's stdout: session 16 piped ``perf.ab`` into ``head``, and the first run died of the
closed pipe.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from perf.cases import case_label


def order(rounds: int) -> list[tuple[int, str]]:
    """(round, side) in run order: new then old in even rounds, old then new in odd ones."""
    out = []
    for i in range(rounds):
        sides = ("new", "old") if i % 2 == 0 else ("old", "new")
        out += [(i, s) for s in sides]
    return out


def case_key(case: dict) -> str:
    return json.dumps({"kernel": case["kernel"], **case["params"]}, sort_keys=True)


def load_cases(folder: Path) -> dict[str, dict]:
    """The cases of the one report in ``folder``, by ``case_key``."""
    reports = sorted(folder.glob("*.json"))
    if len(reports) != 1:
        raise SystemExit(f"perf.ab: expected one report in {folder}, found {len(reports)}")
    return {case_key(c): c for c in json.loads(reports[0].read_text())["cases"]}


def compare(rounds_new: list[dict[str, dict]], rounds_old: list[dict[str, dict]]) -> dict:
    """Per case present in every round of both sides with a time: the old_us / new_us ratio of
    each round, their median and range, and whether every round agreed with the peer (when
    timed with one).  Overall: the median and geometric mean of the per-case medians."""
    keys = [k for k in rounds_new[0]
            if all(r.get(k, {}).get("us") for r in rounds_new + rounds_old)]
    cases = []
    for k in keys:
        ratios = [o[k]["us"] / n[k]["us"] for n, o in zip(rounds_new, rounds_old)]
        agree = [r[k].get("agree") for r in rounds_new + rounds_old]
        first = rounds_new[0][k]
        cases.append({"kernel": first["kernel"], "params": first["params"], "ratios": ratios, "median": statistics.median(ratios),
                      "min": min(ratios), "max": max(ratios),
                      "new_us": statistics.median(r[k]["us"] for r in rounds_new),
                      "old_us": statistics.median(r[k]["us"] for r in rounds_old),
                      "agree": None if all(a is None for a in agree) else all(a is not False for a in agree)})
    cases.sort(key=lambda c: c["median"])
    medians = [c["median"] for c in cases]
    summary = {"cases": len(cases), "rounds": len(rounds_new)}
    if medians:
        summary.update(median=statistics.median(medians),
                       geomean=math.exp(sum(math.log(m) for m in medians) / len(medians)),
                       faster_every_round=sum(c["min"] > 1 for c in cases),
                       slower_every_round=sum(c["max"] < 1 for c in cases))
    return {"summary": summary, "cases": cases}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [f"{s['cases']} cases, {s['rounds']} rounds (old_us / new_us; above 1: the new tree is faster)"]
    if s["cases"]:
        lines.append(f"median {s['median']:.3f}, geometric mean {s['geomean']:.3f}; faster in every round: "
                     f"{s['faster_every_round']}, slower in every round: {s['slower_every_round']}")
    lines += ["", "| median | rounds | new us | old us | agree | case |", "| ---: | --- | ---: | ---: | --- | --- |"]
    for c in result["cases"]:
        rounds = " ".join(f"{r:.3f}" for r in c["ratios"])
        lines.append(f"| {c['median']:.3f} | {rounds} | {c['new_us']:.1f} | {c['old_us']:.1f} | {c['agree']} | "
                     f"{case_label(c['kernel'], c['params'])} |")
    return "\n".join(lines) + "\n"


def env_settings(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` strings as a dict; perf.ab stops, naming it, at a string without "="."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"perf.ab: expected NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def _run(tree: Path, out: Path, args, tag: str, env_extra: dict[str, str]) -> None:
    """One ``python -m perf`` run in ``tree`` with ``env_extra`` set, its output in ``out``.log;
    exits naming the log (and showing its end) if the run fails."""
    commit = args.new_commit if tag.startswith("new") and args.new_commit else tag
    cmd = [sys.executable, "-m", "perf", "--no-png", "--out", str(out), "--commit", commit, "--iters", str(args.iters)]
    if args.filter:
        cmd += ["--filter", *args.filter]
    if args.peer:
        cmd += ["--peer", args.peer]
    env = dict(os.environ, **env_extra, PYTHONPATH=str(tree))
    log = out.with_name(out.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"perf.ab: {tag} in {tree} (log {log})", flush=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(f"perf.ab: {tag} failed (exit {code}); the end of {log}:\n" + "\n".join(tail))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.ab", description=__doc__.splitlines()[0])
    p.add_argument("new", type=Path, help="the tree with the change (cubins built)")
    p.add_argument("old", type=Path, help="the base tree (cubins built)")
    p.add_argument("--filter", action="extend", nargs="+", default=[], metavar="SUBSTR")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running both trees (default 2)")
    p.add_argument("--iters", type=int, default=100, help="timed calls per case and run (default 100)")
    p.add_argument("--peer", default=None, metavar="flashmla[=PATH]", help="passed to python -m perf")
    p.add_argument("--out", type=Path, default=Path("ab-results"), help="output folder (default ab-results)")
    p.add_argument("--new-commit", default=None, metavar="ID",
                   help="the commit the new side's reports record (default: their run's name, new-<i>), so "
                        "that a report of the change can be kept as its run")
    p.add_argument("--new-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the new side's runs only (repeatable)")
    p.add_argument("--old-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the old side's runs only (repeatable)")
    args = p.parse_args(argv)
    envs = {"new": env_settings(args.new_env), "old": env_settings(args.old_env)}
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    trees = {"new": args.new.resolve(), "old": args.old.resolve()}
    for side, tree in trees.items():
        if not (tree / "cute_mla").is_dir():
            p.error(f"{side} tree {tree} has no cute_mla package")
    out = args.out.resolve()
    for i, side in order(args.rounds):
        _run(trees[side], out / f"{side}-{i}", args, f"{side}-{i}", envs[side])
    result = compare([load_cases(out / f"new-{i}") for i in range(args.rounds)],
                     [load_cases(out / f"old-{i}") for i in range(args.rounds)])
    result["summary"]["env"] = envs
    (out / "ab.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
