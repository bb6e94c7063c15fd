#!/usr/bin/env bash
# Every GPU check and benchmark in one go, each step time-boxed, results under $OUT (default bench/out).
#
#   bash bench/run_all.sh [tests|sweep|ops|lce|prologue|rms|grad_error|attention|padded|probe|train|sft|sft_compile ...]
#   (default: tests sweep ops attention train sft, in this order)
#
# Needs a CUDA machine with torch, triton, transformers (and trl, peft, liger-kernel, cut-cross-entropy for
# the peer columns). A step that times out or fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/bench:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0
# Two pytest-xdist workers share the card when xdist is installed (241 s on an H200, where one ran past 335 s; more
# workers run out of its memory together).
xdist=(); python -c "import xdist" 2>/dev/null && xdist=(-n 2)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sweep ops attention train sft)

run() {  # name seconds command...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s), log $OUT/$name.log"
    tail -n 3 "$OUT/$name.log"
}

for step in "${steps[@]}"; do
    case $step in
    tests) run tests 420 python -m pytest -q -m gpu "${xdist[@]}" -p no:cacheprovider --ignore=tests/test_sweep.py tests ;;
    sweep) for op in rms_norm swiglu rope linear_cross_entropy; do
        run "sweep_$op" 300 python bench/sweep.py --cases 500 --ops "$op" --out "$OUT/sweep_$op"
    done ;;
    ops) run ops 300 python bench/ops.py --out "$OUT" ;;
    # The loss's tile kernels by config, its host-side prologue's kernels, RMSNorm by launch shape, and the
    # epilogue counts of the compiled tile kernels (these need no GPU; recorded beside the timings).
    lce) run lce_sass 120 python bench/lce_sass.py --out "$OUT"
        run lce_kernels 300 python bench/lce_kernels.py --out "$OUT" ;;
    prologue) run lce_prologue 120 python bench/lce_prologue.py --out "$OUT" ;;
    rms) run rms_kernels 180 python bench/rms_kernels.py --out "$OUT"
        run rms_dw_sum 120 python bench/rms_dw_sum.py --out "$OUT" ;;
    # The loss's dh and dW errors against the fp64 truth, one pass and recompute path against stock's.
    grad_error) run lce_grad_error 120 python bench/lce_grad_error.py --out "$OUT" ;;
    attention) run attention 180 python bench/attention.py --out "$OUT" ;;
    # Masked SDPA in padded batches (SFT's lengths, then long documents): SDPA's choice against chronipatch's;
    # then compiled with dynamic T, stock as it is against chronipatch.masked_sdpa (bucketed inside the graph).
    padded) run padded_attention 120 python bench/padded_attention.py --out "$OUT/padded"
        run padded_attention_long 180 python bench/padded_attention.py --rows 4 --median 4000 --cap 8192 \
            --out "$OUT/padded_long"
        run padded_compile 240 python bench/padded_compile.py --out "$OUT" ;;
    train) run train 600 python bench/train.py --profile --out "$OUT" ;;
    # bf16 training's gradient errors against the fp32 truth over seeds, chronipatch against stock in the same
    # mode (tests/test_invariants_gpu.py's statistics, over more seeds): about a minute a seed on an H100.
    probe) run invariant_probe 590 python bench/invariant_probe.py --seeds 0,1,2,3,4 --out "$OUT" ;;
    sft) run sft 600 python bench/sft.py --timeout 120 --out "$OUT" --variants \
        stock,stock_packing,liger,chronipatch,chronipatch_packing,lora_stock,lora_chronipatch,lora_chronipatch_packing ;;
    # Inductor's cold compiles of the whole model: minutes per variant.
    sft_compile) run sft_compile 590 python bench/sft.py --timeout 290 --out "$OUT/compile" \
        --variants stock_packing_compile,chronipatch_packing_compile ;;
    *) echo "unknown step $step" >&2 ;;
    esac
done
