#!/bin/bash
# posttrain on one GPU: every demo stage (quick budgets), `posttrain eval`, and the GRPO benchmark against TRL in
# bf16 and fp32 (benchmarks/README, "One GPU"). Run from the repository root on a machine with CUDA:
#   bash benchmarks/gpu_check.sh attention bench-bf16 bench-bf16-cudnn bench-fp32 demo extras profile
# attention: torch's attention backends on new and seen shapes (benchmarks/gpu_attention.py); bench-bf16-cudnn:
# posttrain's GRPO with torch's own attention backends (POSTTRAIN_CUDNN_ATTENTION=1, as before
# models.device.settle_gpu_attention); profile: both libraries' bf16 GRPO under torch's profiler, tables in
# $OUT/profiles. OUT (default /tmp/gpu-check) receives the logs; PACK=<file.tgz>, if set, gets them all after every
# step (a machine that returns few files). A machine without network access can take the Python packages the image
# lacks as wheels in .whl/ (installed into /tmp/site first).
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, torch.cuda.get_device_name())"
run() {  # name, timeout in seconds, command...
  local name=$1 limit=$2; shift 2; local start; start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - start )) s"
  if [ $rc != 0 ]; then grep -E "Error|Traceback" "$OUT/$name.log" | tail -4; tail -3 "$OUT/$name.log"; fi
  cp benchmarks/results/*.jsonl "$OUT/" 2>/dev/null
  if [ -n "$PACK" ]; then tar czf "$PACK" -C "$OUT" .; fi
}
for what in "$@"; do
  case $what in
    demo)
      run demo "${DEMO_T:-240}" python3 -m posttrain demo --quick --out /tmp/qdemo
      grep -E "failed|stopped|[0-9]+ stage" "$OUT/demo.log" | head -12
      for log in /tmp/qdemo/logs/*.log; do
        grep -q Traceback "$log" && { echo "-- $log"; grep -B2 Error "$log" | tail -6; }
      done
      (cd /tmp/qdemo && tar czf "$OUT/qdemo.tgz" logs demo.json ./*/summary.json 2>/dev/null) ;;
    extras)
      run eval 90 python3 -m posttrain eval /tmp/qdemo/grpo --problems 64 --samples 4 --precision auto
      run eval-rm 90 python3 -m posttrain eval /tmp/qdemo/rm ;;
    attention)
      run attention 180 python3 -m benchmarks.gpu_attention; tail -12 "$OUT/attention.log" ;;
    bench-bf16-cudnn)
      run grpo-bf16-cudnn "${BENCH_T:-240}" env POSTTRAIN_CUDNN_ATTENTION=1 python3 -m benchmarks.grpo --precision bf16 \
        --steps "${STEPS:-10}" --libraries posttrain
      tail -3 "$OUT/grpo-bf16-cudnn.log" ;;
    profile)
      run profile "${BENCH_T:-240}" env BENCH_PROFILE="$OUT/profiles" python3 -m benchmarks.grpo --precision bf16 \
        --steps 6 --libraries posttrain,trl
      tail -4 "$OUT/profile.log" ;;
    bench-bf16|bench-fp32)
      run "grpo-${what#bench-}" "${BENCH_T:-240}" python3 -m benchmarks.grpo --precision "${what#bench-}" --steps "${STEPS:-10}"
      tail -4 "$OUT/grpo-${what#bench-}.log" ;;
  esac
done
