#!/usr/bin/env bash
# Second GPU call: the deepspeed rows with attention=sdpa_packed (the first call's winner), then the step
# profile of that step; everything tarred into $OUT/second.tgz (one file comes back).
set -u
export FASTDIT_GIT_COMMIT="$1"
R=/tmp/second; rm -rf $R; mkdir -p $R
export PYTHONPATH=/tmp/fastdit-gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
python3 -c "import deepspeed" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastdit-gpu-check-site wheels/*.whl
echo "== throughput $(date -u +%T)"
timeout 150 python3 benchmarks/throughput.py --batch 128 --warmup 2 --steps 4 --repeats 3 \
  --rows fused/sdpa_packed,deepspeed,deepspeed+compile --set model.attention=sdpa_packed \
  --json $R/throughput_sdpa_packed.json > $R/throughput_sdpa_packed.txt 2>&1
echo "rc=$?"; tail -n 8 $R/throughput_sdpa_packed.txt
L=$(( 215 - ($(date +%s) - start) ))
if [ "$L" -gt 35 ]; then
  echo "== step_profile $(date -u +%T) ($L s)"
  timeout $L python3 benchmarks/step_profile.py --config configs/xl2_zero2.json \
      --set deepspeed.train_micro_batch_size_per_gpu=128 --set deepspeed.train_batch_size=128 \
      --set model.attention=sdpa_packed --trace-steps 1 --out $R/step_profile > $R/step_profile.txt 2>&1
  echo "rc=$?"; sed -n '1,40p' $R/step_profile.txt | head -30
fi
gzip -f $R/step_profile/trace.json 2>/dev/null
tar czf $OUT/second.tgz -C $R . ; ls -la $OUT; echo "done after $(( $(date +%s) - start )) s"
