#!/bin/bash
# Device steps for a session: build here, then one device call a step.
#
#   bash perf/results/pending/next.sh build   # here, no GPU: scratch/main with cubins (both archs)
#   then one device call a step, carry ["scratch", ".peers"], back to back (the machine goes back
#   after 30 s idle):
#   bash perf/results/pending/next.sh proof   # main: the whole grid beside FlashMLA, 3 rounds of
#                                             # issue 19's 24 small-head cases, ncu by role of MODEL1
#                                             # b 32 s_q 1 h_q 16, then the whole GPU suite
#   bash perf/results/pending/next.sh look    # main: grid, issue 19's 3 rounds, then dense h_q 128
#                                             # s_k 4096 profiled beside FlashMLA (both kernels)
#   bash perf/results/pending/next.sh l2near  # exp/dense-l2-near: dense tests, A/B against main
#                                             # (`build-l2near`; about 170 s)
#   bash perf/results/pending/next.sh b5      # dense b 5's timelines and diagnostic kernels
#                                             # (`build-b5`; session 31's, about 120 s)
#   bash perf/results/pending/next.sh h200grid  # `grid` on an H200 only (issue 18's record)
#   bash perf/results/pending/next.sh grid    # main: the grid and 3 rounds of issue 19's cases only
#   bash perf/results/pending/next.sh diag    # the three diag patches against main (timing only;
#                                             # `build-diag` first: session 22's patches, which may
#                                             # need regenerating on main since c7b)
#
# Each step packs its outputs into one OUT/all.tgz (the run tool returns only a few files), and
# skips itself when it would not fit in LIMIT_S (default 590; pass the run's limit_s).  `build`
# writes scratch/base-commit here; do not rewrite it in the device command: the device copy's git
# metadata can be stale (session 25: it reported a437b70 with main two commits on).
# A cold start cost 100-265 s of device time in sessions 22-23.  Never edit a tree under scratch/
# after build: the launcher refuses cubins whose sources changed (session 23 lost a call to it);
# if you must, rerun `python -m cute_mla.compile --arch sm_90a` in that tree (incremental).
DIAGS="noconvert nogather nopv"
# issue 19's targets: b 32 / 128, s_q 1 / 2, h_q 8 / 16 / 32, both formats (24 cases)
SMALL_HEAD_CASES=("sparse_decode fmt=V32 b=32 s_q=1 h_q=" "sparse_decode fmt=V32 b=32 s_q=2 h_q="
                  "sparse_decode fmt=V32 b=128 s_q=1 h_q=" "sparse_decode fmt=V32 b=128 s_q=2 h_q="
                  "sparse_decode fmt=MODEL1 b=32 s_q=1 h_q=" "sparse_decode fmt=MODEL1 b=32 s_q=2 h_q="
                  "sparse_decode fmt=MODEL1 b=128 s_q=1 h_q=" "sparse_decode fmt=MODEL1 b=128 s_q=2 h_q=")
DIAG_CASES=("fmt=MODEL1 b=128 s_q=1 h_q=16 " "fmt=MODEL1 b=32 s_q=1 h_q=16 " "fmt=V32 b=128 s_q=1 h_q=16 "
            "fmt=V32 b=32 s_q=1 h_q=16 ")
# dense h_q 128 (clusters of 2) at s_k 4096 / 32K and s_q 2, b 5 (one row-block kernel), 1M tokens
DENSE_AB=("dense_decode b=128 s_q=1 s_k=4096 " "dense_decode b=128 s_q=2 s_k=8192 " "dense_decode b=128 s_q=1 s_k=32768 "
          "dense_decode b=5 " "dense_decode b=1 ")
DENSE_4096="dense_decode b=128 s_q=1 s_k=4096 h_q=128 h_kv=1 d_qk=576 page_block_size=64 causal=False"
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

# Trees and steps: `tree` / `branch_tree` make a scratch tree of a patch or a branch; a step for
# it is built of `sparse_tests`, `ab`, `suite`, `memcheck` and `prof`, each skipped when it does
# not fit.
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
left() { echo $(( LIMIT - $1 - $(date +%s) + t0 )); }  # left MARGIN: the seconds LIMIT leaves, less MARGIN

prof() {  # prof TREE TAG KERNEL_REGEX CASE [PERF.NCU ARGS]: perf.ncu by role, its CSVs kept (not the report)
    in_time 125 || return
    local t=$1 tag=$2 kernel=$3 case=$4; shift 4
    (cd "scratch/$t" && PYTHONPATH=. timeout 120 python -m perf.ncu run "$case" --kernel "$kernel" --out "$OUT/$tag" "$@" \
        > "$OUT/$tag.txt" 2>&1)
    echo "== $tag rc=$? $(took)"; rm -f "$OUT/$tag/profile.ncu-rep"
}

sparse_tests() {  # sparse_tests TREE TAG [PYTEST ARGS]: the whole sparse decode file, full grid
    local t=$1 tag=$2; shift 2
    in_time 60 || return
    (cd "scratch/$t" && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_sparse_decode.py -o timeout=60 "$@" > "$OUT/$tag-tests.log" 2>&1)
    echo "$tag tests rc=$? $(tail -n 1 "$OUT/$tag-tests.log") $(took)"
}

suite() {  # suite TREE TAG NEED: the whole GPU suite, full grid, if NEED seconds fit; cut at LIMIT
    local t=$1 tag=$2
    in_time "$3" || return
    (cd "scratch/$t" && PYTHONPATH=. timeout "$(left 10)" python -m pytest -q -p no:cacheprovider \
        -m "full or not full" tests -o timeout=60 --durations=15 > "$OUT/$tag-suite.log" 2>&1)
    echo "$tag suite rc=$? $(tail -n 1 "$OUT/$tag-suite.log") $(took)"
}

memcheck() {  # memcheck TREE TAG PYTEST ARGS...: device memory errors only (cuda-python's
    # cuGetProcAddress probes are host API errors, and counted in the summary without this flag)
    local t=$1 tag=$2; shift 2
    in_time 105 || return
    (cd "scratch/$t" && PYTHONPATH=. timeout 100 compute-sanitizer --tool memcheck --report-api-errors no \
        --print-limit 5 python -m pytest -q -p no:cacheprovider -o timeout=90 "$@" > "$OUT/$tag-memcheck.log" 2>&1)
    echo "$tag memcheck rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/$tag-memcheck.log" | tail -n 2) $(took)"
}

ab() {  # ab NEW OLD TAG ROUNDS FILTER...: perf.ab beside FlashMLA, its table's tail
    local new=$1 old=$2 tag=$3 rounds=$4; shift 4
    in_time 90 || return
    python -m perf.ab "scratch/$new" "scratch/$old" --filter "$@" --rounds "$rounds" \
        --peer "flashmla=$CUTE_MLA_PEER" --new-commit "$(base)+$new" --out "$OUT/$tag-ab" > "$OUT/$tag-ab.log" 2>&1
    echo "$tag ab rc=$? $(took)"; grep -v '^perf.ab' "$OUT/$tag-ab.log" | tail -n 24
}

grid_and_small_heads() {  # [TREE]: its whole grid beside FlashMLA, then 3 rounds of issue 19's cases
    local t=${1:-main} commit; commit=$(base); [ "$t" = main ] || commit="$commit+$t"
    if in_time 90; then
        (cd "scratch/$t" && PYTHONPATH=. timeout "$(left 20)" python -m perf \
            --peer "flashmla=$CUTE_MLA_PEER" --commit "$commit" --no-png --out "$OUT/grid" > "$OUT/grid.log" 2>&1)
        echo "grid rc=$? $(took)"; tail -n 3 "$OUT/grid.log"
    fi
    if in_time 60; then
        (cd "scratch/$t" && PYTHONPATH=. timeout "$(left 20)" python -m perf \
            --peer "flashmla=$CUTE_MLA_PEER" --commit "$commit" --no-png --out "$OUT/small-heads" --rounds 3 \
            --filter "${SMALL_HEAD_CASES[@]}" > "$OUT/small-heads.log" 2>&1)
        echo "small heads rc=$? $(took)"; tail -n 2 "$OUT/small-heads.log"
    fi
}

timeline() {  # timeline TREE TAG FILTER...: kineto kernel timelines of both libraries
    local t=$1 tag=$2; shift 2
    in_time 60 || return
    (cd "scratch/$t" && PYTHONPATH=. timeout 120 python "$pending/timeline.py" "$@" > "$OUT/$tag.txt" 2>&1)
    echo "$tag rc=$? $(took)"; grep -v Warning "$OUT/$tag.txt" | tail -n 60
}

own_times() {  # own_times TREE TAG FILTER...: beside FlashMLA, 3 rounds in one process (env: OWN_ENV)
    local t=$1 tag=$2; shift 2
    in_time 30 || return
    (cd "scratch/$t" && env ${OWN_ENV:-} PYTHONPATH=. timeout 60 python -m perf --filter "$@" --rounds 3 --no-png \
        --peer "flashmla=$CUTE_MLA_PEER" --commit "$(base)+$t" \
        --out "$OUT/$tag" > "$OUT/$tag.log" 2>&1)
    echo "$tag rc=$? $(took)"; grep -E "dense_decode" "$OUT/$tag.log" | tail -n 3
}

dense_tests() {  # dense_tests TREE TAG [PYTEST ARGS]: the dense decode file (fast set unless told)
    local t=$1 tag=$2; shift 2
    in_time 60 || return
    (cd "scratch/$t" && PYTHONPATH=. timeout "$(left 10)" python -m pytest -q -p no:cacheprovider \
        tests/test_dense_decode.py -o timeout=60 "$@" > "$OUT/$tag-tests.log" 2>&1)
    echo "$tag tests rc=$? $(tail -n 1 "$OUT/$tag-tests.log") $(took)"
}

case "${1:-}" in
build)
    mkdir -p scratch && git rev-parse --short HEAD > scratch/base-commit
    tree main
    for t in main; do  # both architectures: the suite's wheel test
        (cd scratch/$t && python -m cute_mla.compile | tail -n 1) &
    done
    wait
    ;;
build-l2near)
    # exp/dense-l2-near for `l2near` (sm_90a only)
    branch_tree l2near exp/dense-l2-near
    (cd scratch/l2near && python -m cute_mla.compile --arch sm_90a | tail -n 1)
    ;;
build-b5)
    # dense b 5 diagnostics (timing only, wrong outputs): merge chunks that do nothing, merges
    # that do not wait for their splits, and a kernel of tickets alone (no split work, no merge)
    for d in nomerge nowait empty; do
        tree "b5-$d" "diag-b5-$d.patch"
        cp -r scratch/main/cute_mla/_cubins "scratch/b5-$d/cute_mla/"
    done
    for d in nomerge nowait empty; do
        (cd "scratch/b5-$d" && python -m cute_mla.compile --arch sm_90a --only dense_decode_sm90__cluster_rows-1__dtype-bf16 | tail -n 1)
    done
    ;;
build-diag)
    for d in $DIAGS; do tree "diag-$d" "diag-$d.patch"; done
    for d in $DIAGS; do (cd scratch/diag-$d && python -m cute_mla.compile --arch sm_90a | tail -n 1) & done
    wait
    ;;
proof)
    # main's whole grid beside FlashMLA (46-60 s), 3 rounds of issue 19's small-head cases
    # (25-75 s), where MODEL1 b 32 s_q 1 h_q 16's time goes, then the whole GPU suite (75-180 s;
    # sessions 26-28).  Session 28 ran every call on an H100: the H200 record is missing since c12
    grid_and_small_heads
    prof main m1-b32-h16 '[Hh]eads' "sparse_decode fmt=MODEL1 b=32 s_q=1 h_q=16 "
    suite main main 170
    ;;
look)
    # main beside FlashMLA: the grid and issue 19's 3 rounds (the H200 record, if an H200
    # comes), then (`profiles` alone starts here) dense h_q 128 s_k 4096 s_q 1 and dense b 5
    # profiled with FlashMLA's call in the same process: both libraries' kernel durations, our
    # kernels' stalls and FlashMLA's dense kernel's (about 60 s on an H100, session 29)
    grid_and_small_heads
    ;&
profiles)
    prof main d4096 'DenseDecode' "$DENSE_4096" --peer
    prof main d4096-flashmla 'splitkv' "$DENSE_4096" --peer
    prof main b5 'DenseDecode' "dense_decode b=5 s_q=3 s_k=777" --peer
    ;;
l2near)
    # exp/dense-l2-near (`build-l2near`): the dense full grid on its tree, then against main
    # beside FlashMLA, 3 rounds (about 170 s on an H100)
    dense_tests l2near l2near -m "full or not full"
    ab l2near main l2near 3 "${DENSE_AB[@]}" "dense_decode b=128 s_q=1 s_k=16384 "
    ;;
b5)
    # dense b 5 s_q 3 (`build-b5` first): kineto timelines of both libraries (b 5, the 1M-token
    # request, s_k 4096), then main and the three diagnostic kernels beside FlashMLA, 3 rounds each
    timeline main timeline "dense_decode b=5 " "dense_decode b=1 " "$DENSE_4096"
    for d in main b5-nomerge b5-nowait b5-empty; do own_times "$d" "diag-$d" "dense_decode b=5 "; done
    ;;
h200grid)
    # on an H200 only (`build` first): main's grid and issue 19's 3 rounds, issue 18's H200 record
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then grid_and_small_heads
    else echo "not an H200: nothing run"; fi
    ;;
grid)
    # main beside FlashMLA: the whole grid, then 3 rounds of issue 19's cases (about 90 s)
    grid_and_small_heads
    ;;
diag)
    for d in $DIAGS; do ab "diag-$d" main "diag-$d" 1 "${DIAG_CASES[@]}"; done
    ;;
*)
    echo "usage: $0 build|build-l2near|build-b5|build-diag|proof|look|profiles|l2near|b5|h200grid|grid|diag" >&2
    exit 2
    ;;
esac
