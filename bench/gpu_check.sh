#!/usr/bin/env bash
# One time-boxed GPU session: the correctness checks (GPU tests beside the accuracy sweeps: neither is
# timed), then the timed benchmarks alone on the card. Everything lands in one archive under $OUT.
#
#   [SWEEP_OPS="rope ..."] bash bench/gpu_check.sh [check] [timed-steps ...]   e.g. `check attention ops`
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-bench/out}
export OUT=$final/run
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
steps=("$@")
if [ "${steps[0]:-}" = check ]; then
    steps=("${steps[@]:1}")
    export PYTHONPATH="$PWD/src:$PWD/bench:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
    timeout "${TESTS_LIMIT:-390}" python -m pytest -q -m gpu -p no:cacheprovider --ignore=tests/test_sweep.py \
        tests >"$OUT/tests.log" 2>&1 &
    # The sweeps are small launches: they share the card with the tests, each in its own process.
    read -ra ops <<<"${SWEEP_OPS:-rms_norm swiglu rope linear_cross_entropy}"
    for op in "${ops[@]}"; do
        timeout "${SWEEP_LIMIT:-390}" python bench/sweep.py --cases 500 --ops "$op" --out "$OUT/sweep_$op" \
            >"$OUT/sweep_$op.log" 2>&1 &
    done
    wait
    for op in "${ops[@]}"; do
        echo "== sweep $op"; tail -n 4 "$OUT/sweep_$op.log"
    done
    echo "== tests"; tail -n 15 "$OUT/tests.log"
fi
[ ${#steps[@]} -gt 0 ] && bash bench/run_all.sh "${steps[@]}"
tar czf "$final/run.tgz" -C "$final" run && rm -rf "$OUT"
