"""Which quantization method a model's layers got, and the device memory allocated, for
Llama-3.1-8B shapes with dummy weights: ``python3 benchmarks/bnb_probe.py bitsandbytes`` (one
GPU; session 28 used it to confirm that ``bench latency --quantization bitsandbytes`` with
``--load-format dummy`` serves the bnb 4-bit layers)."""
import time, torch, sys
from tessellm import LLM, SamplingParams
llm = LLM("benchmarks/model-configs/llama-3.1-8b", load_format="dummy", quantization=sys.argv[1] if len(sys.argv) > 1 else None,
          max_model_len=1024, gpu_memory_utilization=0.5)
m = llm.engine.core.runner.model if hasattr(llm.engine.core, "runner") else None
print("model type", type(m))
seen = set()
for name, mod in (m.named_modules() if m is not None else []):
    for k, v in vars(mod).items():
        t = type(v).__name__
        if "Bnb" in t or "Weight" in t:
            if (t, k) not in seen:
                seen.add((t, k)); print("weight", name, k, t)
print("allocated GiB", torch.cuda.memory_allocated() / 2**30)
