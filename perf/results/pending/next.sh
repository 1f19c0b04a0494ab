#!/bin/bash
# Device steps for a session: build here, then one device call a step.
#
#   bash perf/results/pending/next.sh build   # here, no GPU: scratch/{main,c3-c6,diag-*} with cubins
#   then one device call a step, carry ["scratch", ".peers"], back to back (the machine goes back
#   after 30 s idle):
#   bash perf/results/pending/next.sh proof   # main: the small-head dense cases (h_kv 1, h_q 8 / 16 /
#                                             # 32) beside FlashMLA, then the whole GPU suite
#                                             # (136 s on an H100 in session 23; SUITE_S caps it)
#   bash perf/results/pending/next.sh records   # branches exp/records-before-gather (c6, on main: the
#                                             # next block's records before the gather) and
#                                             # exp/heads-codes-before-acquire (c5, c4 + c6's change,
#                                             # MODEL1's producer groups loading codes before the
#                                             # acquire): tests of both, A/B c6 vs main (small heads
#                                             # and some 64-row cases) and c5 vs c6 at h_q 8 / 16,
#                                             # beside FlashMLA; memcheck; ncu by role; then (time
#                                             # allowing) c6's whole suite and whole grid: one call
#   bash perf/results/pending/next.sh diag    # the three diag patches against main (timing only)
#
# Each step packs its outputs into one OUT/all.tgz (the run tool returns only a few files), and
# skips itself when it would not fit in LIMIT_S (default 590; pass the run's limit_s).  The
# device tree may lack scratch/base-commit (session 23's did): write it in the command.
# A cold start cost 100-265 s of device time in sessions 22-23.  Never edit a tree under scratch/
# after build: the launcher refuses cubins whose sources changed (session 23 lost a call to it);
# if you must, rerun `python -m cute_mla.compile --arch sm_90a` in that tree (incremental).
DIAGS="noconvert nogather nopv"
DIAG_CASES=("fmt=MODEL1 b=128 s_q=1 h_q=16 " "fmt=MODEL1 b=32 s_q=1 h_q=16 " "fmt=V32 b=128 s_q=1 h_q=16 "
            "fmt=V32 b=32 s_q=1 h_q=16 ")
set -u
here=$(cd "$(dirname "$0")/../../.." && pwd)
pending=$here/perf/results/pending
cd "$here"
export CUTE_MLA_PEER=$here/.peers/_flashmla_C.abi3.so
t0=$(date +%s)
took() { pack; echo "($(( $(date +%s) - t0 )) s)"; }
base() { cat "$here/scratch/base-commit"; }
# The steps write to a work folder; every `took` snapshots it into the run's OUT as all.tgz, so
# a call cut short (run's limit falls with the device time left) still returns what it did.
RET=${OUT:-/tmp/next-ret}; OUT=/tmp/next-out; rm -rf "$OUT"; mkdir -p "$OUT" "$RET"
LIMIT=${LIMIT_S:-590}  # the seconds this call may run: the run's limit_s, less a margin
pack() { rm -rf "$OUT"/*-ab/old-*; tar czf "$RET/all.tgz.part" -C "$OUT" . && mv "$RET/all.tgz.part" "$RET/all.tgz"; }

tree() {  # tree NAME PATCH...: scratch/NAME is HEAD with these patches of pending/, in order
    local name=$1; shift
    rm -rf "scratch/$name" && mkdir -p "scratch/$name" && git archive HEAD | tar -x -C "scratch/$name"
    for patch in "$@"; do (cd "scratch/$name" && patch -s -p1 < "$pending/$patch") || exit 1; done
}

branch_tree() {  # branch_tree NAME BRANCH: scratch/NAME is that branch's tree
    rm -rf "scratch/$1" && mkdir -p "scratch/$1" && git archive "$2" | tar -x -C "scratch/$1"
}

in_time() {  # in_time NEED: whether NEED more seconds fit in LIMIT
    [ $(( $(date +%s) - t0 + $1 )) -lt "$LIMIT" ] || { echo "(skipped: $1 s do not fit in $LIMIT)"; return 1; }; }

prof() {  # prof TREE TAG KERNEL_REGEX CASE: perf.ncu by role, its CSVs kept (not the report)
    in_time 125 || return
    (cd "scratch/$1" && PYTHONPATH=. timeout 120 python -m perf.ncu run "$4" --kernel "$3" --out "$OUT/$2" \
        > "$OUT/$2.txt" 2>&1)
    echo "== $2 rc=$? $(took)"; rm -f "$OUT/$2/profile.ncu-rep"
}

sparse_tests() {  # sparse_tests TREE TAG [PYTEST ARGS]: the whole sparse decode file, full grid
    local t=$1 tag=$2; shift 2
    in_time 60 || return
    (cd "scratch/$t" && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_sparse_decode.py -o timeout=60 "$@" > "$OUT/$tag-tests.log" 2>&1)
    echo "$tag tests rc=$? $(tail -n 1 "$OUT/$tag-tests.log") $(took)"
}

ab() {  # ab NEW OLD TAG ROUNDS FILTER...: perf.ab beside FlashMLA, its table's tail
    local new=$1 old=$2 tag=$3 rounds=$4; shift 4
    in_time 90 || return
    python -m perf.ab "scratch/$new" "scratch/$old" --filter "$@" --rounds "$rounds" \
        --peer "flashmla=$CUTE_MLA_PEER" --new-commit "$(base)+$new" --out "$OUT/$tag-ab" > "$OUT/$tag-ab.log" 2>&1
    echo "$tag ab rc=$? $(took)"; grep -v '^perf.ab' "$OUT/$tag-ab.log" | tail -n 24
}

case "${1:-}" in
build)
    mkdir -p scratch && git rev-parse --short HEAD > scratch/base-commit
    tree main
    branch_tree c3 exp/heads-split-producers
    branch_tree c4 exp/heads-alt-producers
    branch_tree c5 exp/heads-codes-before-acquire
    branch_tree c6 exp/records-before-gather
    for d in $DIAGS; do tree "diag-$d" "diag-$d.patch"; done
    for t in main c6; do  # both architectures: the wheel test of the whole suite
        (cd scratch/$t && python -m cute_mla.compile | tail -n 1) &
    done
    for t in c3 c4 c5 $(for d in $DIAGS; do echo diag-$d; done); do
        (cd scratch/$t && python -m cute_mla.compile --arch sm_90a | tail -n 1) &
    done
    wait
    ;;
proof)
    (cd scratch/main && PYTHONPATH=. python -m perf --peer "flashmla=$CUTE_MLA_PEER" --commit "$(base)" \
        --out "$OUT/grid" --filter "h_q=8 h_kv" "h_q=16 h_kv" "h_q=32 h_kv" > "$OUT/grid.log" 2>&1)
    echo "grid rc=$? $(took)"; tail -n 3 "$OUT/grid.log"
    (cd scratch/main && PYTHONPATH=. timeout "${SUITE_S:-480}" python -m pytest -q -p no:cacheprovider \
        -m "full or not full" tests -o timeout=60 --durations=15 > "$OUT/suite.log" 2>&1)
    echo "suite rc=$? $(tail -n 1 "$OUT/suite.log") $(took)"
    pack
    ;;
records)
    # c6 (exp/records-before-gather, on main): the producer resolves the next block's records
    # before this block's gather; c5 (exp/heads-codes-before-acquire, on c4): c6's change plus
    # c4's producer groups, MODEL1's loading their codes before the acquire
    sparse_tests c6 c6
    ab c6 main c6 2 "h_q=8 " "h_q=16 " "h_q=32 " "b=128 s_q=2 h_q=128" "b=2 s_q=2 h_q=128" "s_q=1 h_q=64"
    sparse_tests c5 c5
    ab c5 c6 c5 2 "fmt=MODEL1 b=32 s_q=1 h_q=8 " "h_q=16 " "fmt=MODEL1 b=128 s_q=1 h_q=8 " "fmt=V32 b=128 s_q=1 h_q=8 "
    for t in c6 c5; do
        in_time 105 || break
        (cd scratch/$t && PYTHONPATH=. timeout 100 compute-sanitizer --tool memcheck --print-limit 5 python -m pytest \
            -q -p no:cacheprovider tests/test_sparse_decode.py -o timeout=90 \
            -k "padded_block_stride or strided_q or all_indices_invalid or some_requests_zero" > "$OUT/$t-memcheck.log" 2>&1)
        echo "$t memcheck rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/$t-memcheck.log" | tail -n 2) $(took)"
    done
    prof c6 m1-c6 '[Hh]eads' "sparse_decode fmt=MODEL1 b=128 s_q=1 h_q=16 "
    prof c5 m1-c5 '[Hh]eads' "sparse_decode fmt=MODEL1 b=128 s_q=1 h_q=16 "
    # if c6 lands as it is, this is its proof (both architectures' cubins), then its whole grid
    # beside FlashMLA (the committable run)
    if in_time 220; then
        (cd scratch/c6 && PYTHONPATH=. timeout 170 python -m pytest -q -p no:cacheprovider -m "full or not full" \
            tests -o timeout=60 > "$OUT/c6-suite.log" 2>&1)
        echo "c6 suite rc=$? $(tail -n 1 "$OUT/c6-suite.log") $(took)"
    fi
    if in_time 120; then
        (cd scratch/c6 && PYTHONPATH=. timeout $(( LIMIT - 20 - $(date +%s) + t0 )) python -m perf --peer "flashmla=$CUTE_MLA_PEER" \
            --commit "$(base)+c6" --no-png --out "$OUT/full" > "$OUT/full.log" 2>&1)
        echo "full grid rc=$? $(took)"; tail -n 2 "$OUT/full.log"
    fi
    pack
    ;;
diag)
    for d in $DIAGS; do ab "diag-$d" main "diag-$d" 1 "${DIAG_CASES[@]}"; done
    pack
    ;;
*)
    echo "usage: $0 build|proof|records|diag" >&2
    exit 2
    ;;
esac
