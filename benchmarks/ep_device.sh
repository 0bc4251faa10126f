#!/usr/bin/env bash
# Expert parallelism (--enable-expert-parallel) on GPUs: the fused MoE conformance cases (the
# expert_map one among them) and the kernel tests on the cuda backend (1 GPU); with 2 or more GPUs
# (nvidia-h100-x2) the two-GPU greedy test against HF, then `bench throughput` of Qwen3-30B-A3B
# shapes (dummy bf16, NUM_PROMPTS (200) requests of 512 in / 128 out) at -tp 2 without and with
# expert parallelism.
# Output in $OUT: ep_conformance.txt, ep_kernels.txt, ep_gpu_test.txt, t_tp2.json, t_tp2_ep.json.
# Run: OUT=/tmp/ep-out bash benchmarks/ep_device.sh (about 6 minutes on 2 H100s).
set -u
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH; t / box
nvidia-smi -L
t ep_conformance 200 python3 -m tessellm.testing --backend cuda -q -k "moe"
t ep_kernels 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fused_moe.py -k "expert_map or end_to_end or decode_path"
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then
  t ep_gpu_test 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_expert_parallel.py -rs
  for ep in "" "--enable-expert-parallel"; do
    name=t_tp2${ep:+_ep}
    box "bench throughput -tp 2 $ep" 200 $B throughput --model benchmarks/model-configs/qwen3-30b-a3b \
      --load-format dummy --max-model-len ${MAX_LEN:-2048} -tp 2 $ep \
      --num-prompts ${NUM_PROMPTS:-200} --input-len 512 --output-len 128 --output-json "$OUT/$name.json"
  done
else
  echo "one GPU: the two-GPU test and the -tp 2 benches skipped (use nvidia-h100-x2)"
fi
