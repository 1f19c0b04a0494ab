#!/bin/bash
# Issue 19's pending change (heads-qt-ahead.patch, session 20; compile-checked, never run on a GPU).
#
#   bash perf/results/pending/heads-qt-ahead.sh build    # here, no GPU: the trees with their cubins (6 min)
#   bash perf/results/pending/heads-qt-ahead.sh device   # on the device (run tool, carry ["scratch", ".peers"])
#   bash perf/results/pending/heads-qt-ahead.sh profile  # on the device, the next call
#   bash perf/results/pending/heads-qt-ahead.sh diag     # on the device, if the budget allows
#   bash perf/results/pending/heads-qt-ahead.sh c1       # on the device, if the budget allows
#   bash perf/results/pending/heads-qt-ahead.sh c2       # on the device, if the budget allows
#   bash perf/results/pending/heads-qt-ahead.sh c3       # on the device, if the budget allows
# (one call each: together they would pass the run tool's 10 minutes a call)
#
# device, about 5 minutes: the candidate's sparse decode tests (full grid, every head count), the
# A/B against main on the h_q 8 / 16 cases beside FlashMLA, memcheck.
# profile, about 3 minutes: perf.ncu of the candidate on MODEL1 b128 s_q1 and V32 b32 s_q1 h_q 16.
# diag, about 4 minutes: the candidate against three variants that each leave one piece of work
# out (diag-*.patch, wrong outputs, for timing only): the FP8 conversion, the gather's latency
# (a warp's 16 tokens read one record), the O^T MMAs.  What each saves is what it costs.
# c1, about 4 minutes: model1-pack-halves.patch on top of the candidate (MODEL1's bf16 packs as the
# products' upper halves, half the producer's F2FP): the MODEL1 sparse decode tests, bit equality
# with the candidate on every scale exponent (same_bits.py), and its A/B against the candidate.
# c2, about 3 minutes: heads-gather-ahead.patch on top of the candidate (the producer loads block
# j + 1's codes into registers before converting block j): the sparse decode tests and its A/B
# against the candidate on the h_q 8 / 16 cases.  (V32 h_q 16 in bf16, not a default type, spills
# 4 words with it; fix that before landing.)
# c3, about 5 minutes (issue 18): sparse-q-ahead.patch on main, the same Q-by-cp.async for the
# 64-row sparse decode kernel (h_q 32, 64, 128): its sparse decode tests, memcheck over the
# corner tests, and its A/B against main beside FlashMLA on the 64-row cases.
# Everything lands in $OUT.
DIAGS="noconvert nogather nopv"
DIAG_CASES=("fmt=MODEL1 b=128 s_q=1 h_q=16 " "fmt=MODEL1 b=32 s_q=1 h_q=16 " "fmt=V32 b=128 s_q=1 h_q=16 "
            "fmt=V32 b=32 s_q=1 h_q=16 ")
set -u
here=$(cd "$(dirname "$0")/../../.." && pwd)
pending=$here/perf/results/pending
cd "$here"
export CUTE_MLA_PEER=$here/.peers/_flashmla_C.abi3.so
t0=$(date +%s)
took() { echo "($(( $(date +%s) - t0 )) s)"; }

tree() {  # tree NAME PATCH...: scratch/NAME is HEAD with these patches of pending/, in order
    local name=$1; shift
    rm -rf "scratch/$name" && mkdir -p "scratch/$name" && git archive HEAD | tar -x -C "scratch/$name"
    for patch in "$@"; do (cd "scratch/$name" && patch -p1 < "$pending/$patch") || exit 1; done
}

sparse_tests() {  # sparse_tests TREE TAG [PYTEST ARGS]: the whole sparse decode file, full grid
    local t=$1 tag=$2; shift 2
    (cd "scratch/$t" && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_sparse_decode.py -o timeout=60 "$@" > "$OUT/$tag-tests.log" 2>&1)
    echo "$tag tests rc=$? $(tail -n 1 "$OUT/$tag-tests.log") $(took)"
}

memcheck() {  # memcheck TREE TAG: the small-plan corner tests (parts without pieces, strided q,
              # padded blocks, every head count) under compute-sanitizer
    (cd "scratch/$1" && PYTHONPATH=. compute-sanitizer --tool memcheck --report-api-errors no \
        python -m pytest -q -p no:cacheprovider tests/test_sparse_decode.py \
        -k "all_indices_invalid or strided_q or padded_block" > "$OUT/$2-memcheck.log" 2>&1)
    echo "$2 memcheck rc=$? $(grep -c 'Invalid' "$OUT/$2-memcheck.log") invalid," \
        "$(tail -n 1 "$OUT/$2-memcheck.log") $(took)"
}

ab() {  # ab NEW OLD TAG ROUNDS PEER(yes|no) FILTER...: perf.ab, its table's tail
    local new=$1 old=$2 tag=$3 rounds=$4 peer=$5; shift 5
    local extra=()
    [ "$peer" = yes ] && extra=(--peer "flashmla=$CUTE_MLA_PEER")
    python -m perf.ab "scratch/$new" "scratch/$old" --filter "$@" --rounds "$rounds" ${extra[@]+"${extra[@]}"} \
        --out "$OUT/$tag-ab" > "$OUT/$tag-ab.log" 2>&1
    echo "$tag ab rc=$? $(took)"; tail -n 24 "$OUT/$tag-ab.log"
}

case "${1:-}" in
build)
    tree base
    tree cand heads-qt-ahead.patch
    for d in $DIAGS; do tree "diag-$d" heads-qt-ahead.patch "diag-$d.patch"; done
    tree cand-c1 heads-qt-ahead.patch model1-pack-halves.patch
    tree cand-c2 heads-qt-ahead.patch heads-gather-ahead.patch
    tree c3 sparse-q-ahead.patch
    for t in base cand cand-c1 cand-c2 c3 $(for d in $DIAGS; do echo diag-$d; done); do  # in parallel
        (cd scratch/$t && python -m cute_mla.compile --arch sm_90a | tail -n 1) &
    done
    wait
    ;;
device)
    sparse_tests cand cand
    ab cand base cand 2 yes "h_q=8 " "h_q=16 "
    memcheck cand cand
    ;;
profile)
    for c in "fmt=MODEL1 b=128 s_q=1 h_q=16 " "fmt=V32 b=32 s_q=1 h_q=16 "; do
        tag=$(echo "$c" | tr -d ' =_')
        (cd scratch/cand && PYTHONPATH=. python -m perf.ncu run "sparse_decode $c" --kernel sparse_decode_heads \
            --out "$OUT/ncu-$tag" 2>&1 | head -n 45)
    done
    echo "done $(took)"
    ;;
diag)
    for d in $DIAGS; do ab "diag-$d" cand "diag-$d" 1 no "${DIAG_CASES[@]}"; done
    ;;
c1)
    sparse_tests cand-c1 c1 -k 512
    (cd scratch/cand && PYTHONPATH=. python "$pending/same_bits.py" save "$OUT/bits.pt")
    (cd scratch/cand-c1 && PYTHONPATH=. python "$pending/same_bits.py" compare "$OUT/bits.pt")
    echo "same_bits rc=$? $(took)"
    ab cand-c1 cand c1 1 no "fmt=MODEL1"
    ;;
c2)
    sparse_tests cand-c2 c2
    ab cand-c2 cand c2 1 no "h_q=8 " "h_q=16 "
    ;;
c3)
    sparse_tests c3 c3
    memcheck c3 c3
    ab c3 base c3 1 yes "h_q=32 " "h_q=64 " "h_q=128 "
    ;;
*)
    echo "usage: $0 build|device|profile|diag|c1|c2|c3" >&2
    exit 2
    ;;
esac
