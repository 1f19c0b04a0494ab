"""CPU tests of ``python -m perf.ab``: run order, per-case comparison, and the orchestration of two trees
(stand-in trees whose ``python -m perf`` writes a fixed report, so no GPU is needed)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from perf import ab

REPO = Path(__file__).resolve().parent.parent


def _case(kernel, us, agree=None, **params):
    return {"kernel": kernel, "params": params, "us": us, "agree": agree}


def _round(*cases):
    return {ab.case_key(c): c for c in cases}


def test_order_alternates_which_tree_runs_first():
    assert ab.order(3) == [(0, "new"), (0, "old"), (1, "old"), (1, "new"), (2, "new"), (2, "old")]
    assert ab.order(1) == [(0, "new"), (0, "old")]


def test_compare_ratios_medians_and_agreement():
    new = [_round(_case("dense_decode", 100.0, True, b=1), _case("dense_decode", 50.0, True, b=2),
                  _case("sparse_decode", 10.0, None, b=3)),
           _round(_case("dense_decode", 110.0, True, b=1), _case("dense_decode", 40.0, False, b=2),
                  _case("sparse_decode", None, None, b=3))]
    old = [_round(_case("dense_decode", 120.0, True, b=1), _case("dense_decode", 45.0, True, b=2),
                  _case("sparse_decode", 10.0, None, b=3)),
           _round(_case("dense_decode", 121.0, True, b=1), _case("dense_decode", 44.0, True, b=2),
                  _case("sparse_decode", 12.0, None, b=3))]
    result = ab.compare(new, old)
    # the case without a time in one round is left out
    assert result["summary"]["cases"] == 2 and result["summary"]["rounds"] == 2
    by_b = {c["params"]["b"]: c for c in result["cases"]}
    assert by_b[1]["ratios"] == pytest.approx([1.2, 1.1])
    assert by_b[1]["median"] == pytest.approx(1.15)
    assert (by_b[1]["min"], by_b[1]["max"]) == pytest.approx((1.1, 1.2))
    assert by_b[1]["agree"] is True
    assert by_b[2]["ratios"] == pytest.approx([0.9, 1.1])
    assert by_b[2]["agree"] is False  # one round disagreed with the peer
    assert by_b[2]["new_us"] == pytest.approx(45.0) and by_b[2]["old_us"] == pytest.approx(44.5)
    s = result["summary"]
    assert s["median"] == pytest.approx((1.15 + 1.0) / 2)
    assert s["geomean"] == pytest.approx((1.15 * 1.0) ** 0.5)
    assert (s["faster_every_round"], s["slower_every_round"]) == (1, 0)
    # slowest case first
    assert [c["params"]["b"] for c in result["cases"]] == [2, 1]
    md = ab.markdown(result)
    assert "| 1.150 | 1.200 1.100 | 105.0 | 120.5 | True | dense_decode b=1 |" in md


def _stand_in_tree(root: Path, name: str, us, log: Path, fail: bool = False) -> Path:
    """A tree whose ``python -m perf`` logs its call, prints a line and writes one report with
    time ``us`` (a Python expression, evaluated there; or, with ``fail``, prints a line and
    exits 3)."""
    tree = root / name
    (tree / "cute_mla").mkdir(parents=True)
    (tree / "perf").mkdir()
    (tree / "perf" / "__init__.py").write_text("")
    (tree / "perf" / "__main__.py").write_text(textwrap.dedent(f"""
        import json, os, sys
        from pathlib import Path
        args = sys.argv[1:]
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        with open({str(log)!r}, "a") as f:
            f.write({name!r} + " " + args[args.index("--commit") + 1] + " " + os.environ["PYTHONPATH"] + "\\n")
        print("measuring in", {name!r})
        if {fail!r}:
            sys.exit(3)
        case = {{"kernel": "k", "params": {{"n": 1}}, "us": {us}, "agree": True}}
        (out / "r.json").write_text(json.dumps({{"cases": [case]}}))
    """))
    return tree


def test_main_runs_both_trees_in_alternating_order(tmp_path):
    log = tmp_path / "calls.log"
    new = _stand_in_tree(tmp_path, "newtree", 80.0, log)
    old = _stand_in_tree(tmp_path, "oldtree", 100.0, log)
    out = tmp_path / "ab"
    proc = subprocess.run([sys.executable, "-m", "perf.ab", str(new), str(old), "--rounds", "2", "--out", str(out),
                           "--filter", "k"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = [line.split() for line in log.read_text().splitlines()]
    assert [c[:2] for c in calls] == [["newtree", "new-0"], ["oldtree", "old-0"], ["oldtree", "old-1"],
                                       ["newtree", "new-1"]]
    assert all(c[2] == str(tmp_path / c[0]) for c in calls)  # each run sees only its own tree
    result = json.loads((out / "ab.json").read_text())
    assert result["summary"]["cases"] == 1
    assert result["cases"][0]["ratios"] == pytest.approx([1.25, 1.25])
    assert "median 1.250" in proc.stdout
    # each run's output went to its own log, not to perf.ab's stdout
    assert (out / "new-1.log").read_text() == "measuring in newtree\n"
    assert (out / "old-0.log").read_text() == "measuring in oldtree\n"
    assert "measuring in" not in proc.stdout


def test_main_stops_naming_the_log_of_a_failed_run(tmp_path):
    log = tmp_path / "calls.log"
    new = _stand_in_tree(tmp_path, "newtree", 80.0, log, fail=True)
    old = _stand_in_tree(tmp_path, "oldtree", 100.0, log)
    out = tmp_path / "ab"
    proc = subprocess.run([sys.executable, "-m", "perf.ab", str(new), str(old), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"new-0 failed (exit 3); the end of {out / 'new-0.log'}" in proc.stderr
    assert "measuring in newtree" in proc.stderr
    assert not (out / "ab.json").exists()


def test_per_side_environment_times_a_switch_inside_one_tree(tmp_path):
    """--new-env / --old-env reach only their side's runs: one tree whose time depends on a
    variable is compared with itself, the switch on one side."""
    log = tmp_path / "calls.log"
    tree = _stand_in_tree(tmp_path, "tree", "50.0 if os.environ.get('SWITCH') == 'on' else 100.0", log)
    out = tmp_path / "ab"
    proc = subprocess.run([sys.executable, "-m", "perf.ab", str(tree), str(tree), "--out", str(out),
                           "--new-env", "SWITCH=on", "--old-env", "OTHER=1"], cwd=REPO, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != "SWITCH"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "ab.json").read_text())
    assert result["cases"][0]["ratios"] == pytest.approx([2.0, 2.0])
    assert result["summary"]["env"] == {"new": {"SWITCH": "on"}, "old": {"OTHER": "1"}}
    bad = subprocess.run([sys.executable, "-m", "perf.ab", str(tree), str(tree), "--out", str(out),
                          "--new-env", "NOEQUALS"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "expected NAME=VALUE, got 'NOEQUALS'" in bad.stderr


def test_main_rejects_a_folder_that_is_not_a_tree(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "perf.ab", str(tmp_path), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "has no cute_mla package" in proc.stderr


def test_new_commit_is_what_the_new_side_records(tmp_path):
    """--new-commit names the new side's reports (a report of the change kept as its run); the
    old side's keep their run names."""
    log = tmp_path / "calls.log"
    new = _stand_in_tree(tmp_path, "newtree", 80.0, log)
    old = _stand_in_tree(tmp_path, "oldtree", 100.0, log)
    proc = subprocess.run([sys.executable, "-m", "perf.ab", str(new), str(old), "--rounds", "1", "--out",
                           str(tmp_path / "ab"), "--new-commit", "abc1234+change"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[:2] for line in log.read_text().splitlines()] == [["newtree", "abc1234+change"],
                                                                            ["oldtree", "old-0"]]
