# Sourced by the CPU benchmark scripts (cpu_speed.sh, spec_cpu.sh): the environment they share
# and $OUT/meta.txt (date, commit, machine, torch, load at start). Needs $OUT set.
PY=${PY:-python}
export PYTHONPATH=${PYTHONPATH:-.} TESSELLM_PLUGINS=${TESSELLM_PLUGINS:-cpu}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo '(+ working tree)')"
  echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(uname -r)"
  echo "torch: $($PY -c 'import torch; print(torch.__version__)')"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/meta.txt"
