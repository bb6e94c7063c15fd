#!/usr/bin/env bash
# usage: bash abl/gpu.sh CALL
call=$1
start=$(date +%s)
step() {  # name timeout cmd...
  local name=$1 t=$2; shift 2
  local left=$((${BUDGET:-570} - ($(date +%s) - start)))
  if [ "$left" -lt 20 ]; then echo "SKIP $name (time)" | tee -a $OUT/steps.txt; return; fi
  [ "$t" -gt "$left" ] && t=$left
  local t0=$(date +%s)
  echo "$name start $(date +%T.%N)" >> $OUT/steps.txt
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s end $(date +%T.%N)" | tee -a $OUT/steps.txt
  tail -4 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt
python -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)" >> $OUT/smi.txt
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active --format=csv -lms 200 > $OUT/clocks.csv 2>&1 &
smi=$!
case $call in
1)
  step diag2 150 python abl/diag2.py
  step diag3 120 python abl/diag3.py
  step patch_gpu 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_patch_gpu.py
  ;;
2)  # call 3; call 2 had reached patch_gpu's 200 s limit
  step patch_gpu 330 python -m pytest -m gpu -q -p no:cacheprovider --durations=5 tests/test_patch_gpu.py
  step lce_tests 240 python -m pytest -m gpu -q -p no:cacheprovider tests/test_kernels_lce_rows.py tests/test_ops_gpu.py -k "lce or truth or cross"
  step inv_llama 260 python -m pytest -m gpu -q -p no:cacheprovider tests/test_invariants_gpu.py -k "bf16 and llama"
  ;;
esac
kill $smi
