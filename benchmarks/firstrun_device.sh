#!/usr/bin/env bash
# What the FIRST workload-F run of a process pays that the second does not (H100: ~8.4 s against
# ~6.7-7.2 s warm; benchmarks/README.md). One GPU, Llama-3.1-8B shapes (dummy bf16), F = 256 x
# 512 in / 256 out, greedy; each part one process (benchmarks/firstrun.py): LLM(...), the bench's
# tiny warm-up, then F twice (other random tokens, same lengths: the same schedule). ~3.5 min;
# run it with a 600 s limit. Parts (each time-boxed, seconds; 0 skips):
#   A cold_nowarm    (A_S 120) empty TRITON_CACHE_DIR, no kernel warm-up: `bench throughput
#                    --warmup tiny` as the lead ran it (LLM's default: kernel_warmup off)
#   C cold_warmup    (C_S 150) empty TRITON_CACHE_DIR of its own, kernel_warmup=True: the serving
#                    engine's warm-up ("ready means warm"): does F's first run still pay?
#   B warmcache_prof (B_S 120) A's cache (warm), no kernel warm-up, torch.profiler (CPU + CUDA
#                    runtime) over each run's first PROF_S (2) seconds: what is left once nothing
#                    compiles from source, and which host ops / CUDA calls run 1 spends on
# Per run one line "RUN i: T s (tok/s) | Triton N compiles (S s in the hooks) | graphs captured,
# first replays | reserved before -> after GiB, segments +n, device mallocs +n, alloc retries
# +n, pinned segments +n, peak | launch host s" and the kernels compiled; then "run 1 vs run 2
# by step": run 1's extra seconds over run 2 on mixed (prompt) steps and on decode steps, the
# worst steps, and "SUMMARY". Raw: $OUT/<part>.json (per-step rows), $OUT/<part>.txt (logs).
# Reading: A's run 1 - run 2 is the gap; C's "run 1 compiled 0" and a ratio ~1.0 mean the
# serving warm-up covers it; B's ratio is what a warm TRITON_CACHE_DIR leaves; "segments +n" /
# "retries +n" in run 1 but not run 2 point at allocator growth (cudaMalloc in the profile).
#   bash benchmarks/firstrun_device.sh     (repo root; carry .whl and tessellm.egg-info as usual)
# Knobs: A_S, C_S, B_S, PROF_S, NP (256 prompts), ENGINE (extra firstrun.py engine args, e.g.
# "--max-num-batched-tokens=8192").
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
P="python3 benchmarks/firstrun.py --model ${MODEL:-$L8} --num-prompts ${NP:-256} --input-len ${IN:-512} --output-len ${OUTLEN:-256} --max-model-len ${MAXLEN:-4096}"
CA=/tmp/firstrun-triton-a TCC=/tmp/firstrun-triton-c
rm -rf "$CA" "$TCC"; mkdir -p "$CA" "$TCC"
part() {  # part NAME SECONDS CACHE_DIR ARGS...
  local name=$1 secs=$2 cache=$3; shift 3
  echo "=== $name (limit $secs s; TRITON_CACHE_DIR holds $(find "$cache" -type f | wc -l) files) $(date -u +%T)"
  [ "$secs" -gt 0 ] || return 0
  TRITON_CACHE_DIR=$cache timeout "$secs" $P --label "$name" --output-json "$OUT/$name.json" \
    ${ENGINE:-} "$@" > "$OUT/$name.txt" 2>&1
  echo "rc=$?"
  grep -E "^\[$name\]|^    |Traceback|Error" "$OUT/$name.txt" | tail -70
}
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo ${COMMIT:-unknown})"; date -u
  part cold_nowarm "${A_S:-120}" "$CA"
  part cold_warmup "${C_S:-150}" "$TCC" --kernel-warmup
  part warmcache_prof "${B_S:-120}" "$CA" --profile-s "${PROF_S:-2}"
  echo "=== summary"
  grep -h "SUMMARY\|start .* s:" "$OUT"/cold_nowarm.txt "$OUT"/cold_warmup.txt "$OUT"/warmcache_prof.txt 2>/dev/null
} 2>&1 | tee "$OUT/firstrun_log.txt"
