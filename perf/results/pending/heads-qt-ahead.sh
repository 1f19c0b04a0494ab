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
cd "$here"
case "${1:-}" in
build)
    rm -rf scratch/base scratch/cand && mkdir -p scratch/base scratch/cand
    git archive HEAD | tar -x -C scratch/base
    git archive HEAD | tar -x -C scratch/cand
    (cd scratch/cand && patch -p1 < "$here/perf/results/pending/heads-qt-ahead.patch")
    for d in $DIAGS; do
        rm -rf scratch/diag-$d && mkdir -p scratch/diag-$d && git archive HEAD | tar -x -C scratch/diag-$d
        (cd scratch/diag-$d && patch -p1 < "$here/perf/results/pending/heads-qt-ahead.patch" \
            && patch -p1 < "$here/perf/results/pending/diag-$d.patch")
    done
    rm -rf scratch/cand-c1 && mkdir -p scratch/cand-c1 && git archive HEAD | tar -x -C scratch/cand-c1
    (cd scratch/cand-c1 && patch -p1 < "$here/perf/results/pending/heads-qt-ahead.patch" \
        && patch -p1 < "$here/perf/results/pending/model1-pack-halves.patch")
    rm -rf scratch/cand-c2 && mkdir -p scratch/cand-c2 && git archive HEAD | tar -x -C scratch/cand-c2
    (cd scratch/cand-c2 && patch -p1 < "$here/perf/results/pending/heads-qt-ahead.patch" \
        && patch -p1 < "$here/perf/results/pending/heads-gather-ahead.patch")
    rm -rf scratch/c3 && mkdir -p scratch/c3 && git archive HEAD | tar -x -C scratch/c3
    (cd scratch/c3 && patch -p1 < "$here/perf/results/pending/sparse-q-ahead.patch")
    for t in base cand cand-c1 cand-c2 c3 $(for d in $DIAGS; do echo diag-$d; done); do  # in parallel
        (cd scratch/$t && python -m cute_mla.compile --arch sm_90a | tail -n 1) &
    done
    wait
    ;;
device)
    export CUTE_MLA_PEER=$here/.peers/_flashmla_C.abi3.so
    t0=$(date +%s)
    (cd scratch/cand && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_sparse_decode.py -o timeout=60 > "$OUT/tests.log" 2>&1)
    echo "tests rc=$? $(tail -n 1 "$OUT/tests.log") ($(( $(date +%s) - t0 )) s)"
    python -m perf.ab scratch/cand scratch/base --filter "h_q=8 " "h_q=16 " --rounds 2 \
        --peer "flashmla=$CUTE_MLA_PEER" --out "$OUT/ab" > "$OUT/ab.log" 2>&1
    echo "ab rc=$? ($(( $(date +%s) - t0 )) s)"; tail -n 24 "$OUT/ab.log"
    # memcheck on small plans with empty parts (the Q^T fetch ahead clamps the request there),
    # strided q, padded blocks, every head count
    (cd scratch/cand && PYTHONPATH=. compute-sanitizer --tool memcheck --report-api-errors no \
        python -m pytest -q -p no:cacheprovider tests/test_sparse_decode.py \
        -k "all_indices_invalid or strided_q or padded_block" > "$OUT/memcheck.log" 2>&1)
    echo "memcheck rc=$? $(grep -c 'Invalid' "$OUT/memcheck.log") invalid, $(tail -n 1 "$OUT/memcheck.log")" \
        "($(( $(date +%s) - t0 )) s)"
    ;;
profile)
    t0=$(date +%s)
    for c in "fmt=MODEL1 b=128 s_q=1 h_q=16 " "fmt=V32 b=32 s_q=1 h_q=16 "; do
        tag=$(echo "$c" | tr -d ' =_')
        (cd scratch/cand && PYTHONPATH=. python -m perf.ncu run "sparse_decode $c" --kernel sparse_decode_heads \
            --out "$OUT/ncu-$tag" 2>&1 | head -n 45)
    done
    echo "done ($(( $(date +%s) - t0 )) s)"
    ;;
diag)
    t0=$(date +%s)
    for d in $DIAGS; do
        python -m perf.ab scratch/diag-$d scratch/cand --filter "${DIAG_CASES[@]}" --rounds 1 \
            --out "$OUT/diag-$d" > "$OUT/diag-$d.log" 2>&1
        echo "== diag-$d rc=$? ($(( $(date +%s) - t0 )) s)"; tail -n 8 "$OUT/diag-$d.log"
    done
    ;;
c1)
    t0=$(date +%s)
    (cd scratch/cand-c1 && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_sparse_decode.py -k 512 -o timeout=60 > "$OUT/c1-tests.log" 2>&1)
    echo "c1 tests rc=$? $(tail -n 1 "$OUT/c1-tests.log") ($(( $(date +%s) - t0 )) s)"
    (cd scratch/cand && PYTHONPATH=. python "$here/perf/results/pending/same_bits.py" save "$OUT/bits.pt")
    (cd scratch/cand-c1 && PYTHONPATH=. python "$here/perf/results/pending/same_bits.py" compare "$OUT/bits.pt")
    echo "same_bits rc=$? ($(( $(date +%s) - t0 )) s)"
    python -m perf.ab scratch/cand-c1 scratch/cand --filter "fmt=MODEL1" --rounds 1 --out "$OUT/c1-ab" \
        > "$OUT/c1-ab.log" 2>&1
    echo "c1 ab rc=$? ($(( $(date +%s) - t0 )) s)"; tail -n 24 "$OUT/c1-ab.log"
    ;;
c2)
    t0=$(date +%s)
    (cd scratch/cand-c2 && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_sparse_decode.py -o timeout=60 > "$OUT/c2-tests.log" 2>&1)
    echo "c2 tests rc=$? $(tail -n 1 "$OUT/c2-tests.log") ($(( $(date +%s) - t0 )) s)"
    python -m perf.ab scratch/cand-c2 scratch/cand --filter "h_q=8 " "h_q=16 " --rounds 1 --out "$OUT/c2-ab" \
        > "$OUT/c2-ab.log" 2>&1
    echo "c2 ab rc=$? ($(( $(date +%s) - t0 )) s)"; tail -n 20 "$OUT/c2-ab.log"
    ;;
c3)
    export CUTE_MLA_PEER=$here/.peers/_flashmla_C.abi3.so
    t0=$(date +%s)
    (cd scratch/c3 && PYTHONPATH=. python -m pytest -q -p no:cacheprovider -m "full or not full" \
        tests/test_sparse_decode.py -o timeout=60 > "$OUT/c3-tests.log" 2>&1)
    echo "c3 tests rc=$? $(tail -n 1 "$OUT/c3-tests.log") ($(( $(date +%s) - t0 )) s)"
    (cd scratch/c3 && PYTHONPATH=. compute-sanitizer --tool memcheck --report-api-errors no \
        python -m pytest -q -p no:cacheprovider tests/test_sparse_decode.py \
        -k "all_indices_invalid or strided_q or padded_block" > "$OUT/c3-memcheck.log" 2>&1)
    echo "c3 memcheck rc=$? $(grep -c 'Invalid' "$OUT/c3-memcheck.log") invalid ($(( $(date +%s) - t0 )) s)"
    python -m perf.ab scratch/c3 scratch/base --filter "h_q=32 " "h_q=64 " "h_q=128 " --rounds 1 \
        --peer "flashmla=$CUTE_MLA_PEER" --out "$OUT/c3-ab" > "$OUT/c3-ab.log" 2>&1
    echo "c3 ab rc=$? ($(( $(date +%s) - t0 )) s)"; tail -n 20 "$OUT/c3-ab.log"
    ;;
*)
    echo "usage: $0 build|device|profile|diag|c1|c2|c3" >&2
    exit 2
    ;;
esac
