#!/bin/bash
# The pending Q change (q-ahead.patch: issue 19's small-head kernel and issue 18's 64-row sparse
# decode kernel; compile-checked, never run on a GPU) and the variants on top of it.
#
#   bash perf/results/pending/q-ahead.sh build    # here, no GPU: the trees with their cubins (about 6 minutes)
#   bash perf/results/pending/q-ahead.sh device   # on the device (run tool, carry ["scratch", ".peers"])
#   bash perf/results/pending/q-ahead.sh grid     # on the device, the next call; then, as the budget allows:
#   bash perf/results/pending/q-ahead.sh profile
#   bash perf/results/pending/q-ahead.sh diag
#   bash perf/results/pending/q-ahead.sh c1
#   bash perf/results/pending/q-ahead.sh c2
#   bash perf/results/pending/q-ahead.sh dense
# (one call each: together they would pass the run tool's 10 minutes a call)
#
# device: the change's sparse decode tests (full grid, every head count, both kernels), then
# memcheck over the corner tests.
# grid: perf.ab of the change against main over the whole sparse decode grid (67 cases), one
# round, beside FlashMLA; the change runs first, so its report (OUT/grid-ab/new-0, with peer_us
# and speedup) is complete even if main's run is cut off.  That report is the JSON to commit if
# the patch lands unchanged.
# profile: perf.ncu of the change on MODEL1 b128 s_q1 and V32 b32 s_q1 h_q 16.
# diag: the change against three variants that each leave one piece of work out (diag-*.patch,
# wrong outputs, for timing only): the FP8 conversion, the gather's latency (a warp's 16 tokens
# read one record), the O^T MMAs.  What each saves is what it costs.
# c1: model1-pack-halves.patch on top (MODEL1's bf16 packs as the products' upper halves, half the
# producer's F2FP): the MODEL1 sparse decode tests, bit equality with the change on every scale
# exponent (same_bits.py), its A/B against the change.
# c2: heads-gather-ahead.patch on top (the small-head producer loads block j + 1's codes into
# registers before converting block j): the sparse decode tests (every head count: it also splits
# the 64-row kernel's stage_raw into helpers, byte-identical cubins there), its A/B against the
# change on the h_q 8 / 16 cases.
# dense (issue 18 / 19's dense part): dense-heads.patch on main (dense decode of h_kv 1, h_q 8 / 16,
# s_q 1 on the heads consumer with a TMA page producer): the dense tests at h_q 8 / 16 (full
# grid) and both kernels' small-head test, memcheck on that test, and the A/B of the new kernel
# against the 64-row one in the same tree (CUTE_MLA_DENSE_HEADS=0 on the old side) beside
# FlashMLA.  Read diag-noconvert first: NOTES session 21 says why.
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
    [ -n "${AB_NEW_COMMIT:-}" ] && extra+=(--new-commit "$AB_NEW_COMMIT")
    [ -n "${AB_OLD_ENV:-}" ] && extra+=(--old-env "$AB_OLD_ENV")
    python -m perf.ab "scratch/$new" "scratch/$old" --filter "$@" --rounds "$rounds" ${extra[@]+"${extra[@]}"} \
        --out "$OUT/$tag-ab" > "$OUT/$tag-ab.log" 2>&1
    echo "$tag ab rc=$? $(took)"; tail -n 24 "$OUT/$tag-ab.log"
}

case "${1:-}" in
build)
    mkdir -p scratch && git rev-parse --short HEAD > scratch/base-commit
    tree base
    tree q q-ahead.patch
    for d in $DIAGS; do tree "diag-$d" q-ahead.patch "diag-$d.patch"; done
    tree q-c1 q-ahead.patch model1-pack-halves.patch
    tree q-c2 q-ahead.patch heads-gather-ahead.patch
    tree dense dense-heads.patch
    for t in base q q-c1 q-c2 dense $(for d in $DIAGS; do echo diag-$d; done); do  # in parallel
        (cd scratch/$t && python -m cute_mla.compile --arch sm_90a | tail -n 1) &
    done
    wait
    ;;
device)
    sparse_tests q q
    memcheck q q
    ;;
grid)
    # the new side's report names main's commit plus the patch (the device's copy has no .git:
    # build wrote the commit down)
    AB_NEW_COMMIT="$(cat scratch/base-commit)+q-ahead" \
        ab q base grid 1 yes "sparse_decode fmt="
    ;;
profile)
    for c in "fmt=MODEL1 b=128 s_q=1 h_q=16 " "fmt=V32 b=32 s_q=1 h_q=16 "; do
        tag=$(echo "$c" | tr -d ' =_')
        (cd scratch/q && PYTHONPATH=. python -m perf.ncu run "sparse_decode $c" --kernel sparse_decode_heads \
            --out "$OUT/ncu-$tag" 2>&1 | head -n 45)
    done
    echo "done $(took)"
    ;;
diag)
    for d in $DIAGS; do ab "diag-$d" q "diag-$d" 1 no "${DIAG_CASES[@]}"; done
    ;;
c1)
    sparse_tests q-c1 c1 -k 512
    (cd scratch/q && PYTHONPATH=. python "$pending/same_bits.py" save "$OUT/bits.pt")
    (cd scratch/q-c1 && PYTHONPATH=. python "$pending/same_bits.py" compare "$OUT/bits.pt")
    echo "same_bits rc=$? $(took)"
    ab q-c1 q c1 1 no "fmt=MODEL1"
    ;;
c2)
    sparse_tests q-c2 c2
    AB_NEW_COMMIT="${C2_COMMIT:-$(cat scratch/base-commit)+q-ahead}+c2" ab q-c2 q c2 1 yes "h_q=8 " "h_q=16 "
    ;;
dense)  # dense [TREE]: the dense tree, or qd (q-ahead-dense.patch) once q-ahead has won
    dt=${2:-dense}
    (cd scratch/$dt && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_dense_decode.py -k "h8-kv1 or h16-kv1 or small_heads" -o timeout=60 > "$OUT/dense-tests.log" 2>&1)
    echo "dense tests rc=$? $(tail -n 1 "$OUT/dense-tests.log") $(took)"
    (cd scratch/$dt && PYTHONPATH=. compute-sanitizer --tool memcheck --report-api-errors no \
        python -m pytest -q -p no:cacheprovider tests/test_dense_decode.py -k "small_heads and not 64-row" \
        > "$OUT/dense-memcheck.log" 2>&1)
    echo "dense memcheck rc=$? $(grep -c 'Invalid' "$OUT/dense-memcheck.log") invalid," \
        "$(tail -n 1 "$OUT/dense-memcheck.log") $(took)"
    # the s_q 1 small-head dense cases (the route's), b 32, 64 and 128
    AB_OLD_ENV=CUTE_MLA_DENSE_HEADS=0 ab "$dt" "$dt" dense 2 yes "s_q=1 s_k=8192 h_q=8 h_kv" \
        "s_q=1 s_k=8192 h_q=16 h_kv" "s_q=1 s_k=2048 h_q=8 h_kv"
    ;;
*)
    echo "usage: $0 build|device|grid|profile|diag|c1|c2|dense" >&2
    exit 2
    ;;
esac
