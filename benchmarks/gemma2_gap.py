"""HF's greedy steps on test_cuda_families' tiny Gemma 2 (prompt 0): the top-3 logits and the
gap between the first two per step, on a device, with the float32 matmul settings and the
transformers version, to tell a near-tie from a defect when two greedy runs part.
    python benchmarks/gemma2_gap.py [cuda|cpu]"""

import sys
import tempfile

import torch
import transformers
from transformers import AutoModelForCausalLM

from tests.models.test_cuda_families import _prompts, _save

dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
print("transformers", transformers.__version__, "allow_tf32", torch.backends.cuda.matmul.allow_tf32,
      "float32_matmul_precision", torch.get_float32_matmul_precision())
path = _save("gemma2", tempfile.mkdtemp() + "/m")
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
print("attn_implementation", model.config._attn_implementation)
seq = list(_prompts()[0])
with torch.no_grad():
    for i in range(20):
        top = torch.topk(model(torch.tensor([seq], device=dev)).logits[0, -1].float(), 3)
        print(i, top.indices.tolist(), [round(v, 5) for v in top.values.tolist()],
              "gap", round(float(top.values[0] - top.values[1]), 5))
        seq.append(int(top.indices[0]))
