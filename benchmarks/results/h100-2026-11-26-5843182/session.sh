#!/usr/bin/env bash
# One GPU session (run from the repository root on the GPU machine): `make gpu-check` at its default
# budget (480 s), then the step profile of train.py's step (the deepspeed row's) at batch 128, then
# whatever extra measurements follow. Everything lands under $OUT/res.
# usage: bash .gpu/session.sh COMMIT   (COMMIT: the commit whose tree travelled; recorded in the JSON)
set -u
export FASTDIT_GIT_COMMIT="$1"
R="$OUT/res"; mkdir -p "$R"
start=$(date +%s)
left() { echo $(( ${SESSION_S:-555} - ($(date +%s) - start) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/nvidia_smi.csv" 2>&1
echo "== gpu_check $(date -u +%T)"
python3 benchmarks/gpu_check.py --out "$R/check" > "$R/gpu_check_stdout.txt" 2>&1
echo "gpu_check rc=$? after $(( $(date +%s) - start )) s"; tail -n 25 "$R/gpu_check_stdout.txt"
export PYTHONPATH=/tmp/fastdit-gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
L=$(left)
if [ "$L" -gt 40 ]; then
  echo "== step_profile $(date -u +%T) ($L s left)"
  timeout $((L - 5)) python3 benchmarks/step_profile.py --config configs/xl2_zero2.json \
      --set deepspeed.train_micro_batch_size_per_gpu=128 --set deepspeed.train_batch_size=128 \
      --trace-steps 1 --out "$R/step_profile" > "$R/step_profile.txt" 2>&1
  echo "step_profile rc=$?"; tail -n 30 "$R/step_profile.txt"
  gzip -f "$R/step_profile/trace.json" 2>/dev/null
fi
echo "== done after $(( $(date +%s) - start )) s"
du -sh "$R"/* 2>/dev/null
