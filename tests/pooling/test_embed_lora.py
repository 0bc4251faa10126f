"""LoRA adapters on an embedding model: prompts with different adapters (and none) in one
batch, chunked; each vector equals HF AutoModel's on the checkpoint with that adapter merged."""

from __future__ import annotations

import torch

from tessellm import LLM
from tessellm.lora import LoRARequest
from tests.lora.adapters import make_adapters, merge_adapter
from tests.pooling.conftest import hf_embeddings, random_prompts


def test_mixed_adapters_in_one_batch_equal_merged_hf(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    specs = {"qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16)),
             "mlp16": (16, ["gate_proj", "up_proj", "down_proj", "o_proj"], dict(lora_alpha=8))}
    adapters = make_adapters(path, str(tmp_path / "adapters"), specs=specs)
    loras = {"qv8": LoRARequest("qv8", 1, adapters["qv8"]), "mlp16": LoRARequest("mlp16", 2, adapters["mlp16"])}
    order = ["qv8", None, "mlp16", "qv8", None, "mlp16"]
    prompts = random_prompts(len(order), seed=31, lo=20, hi=70)
    with LLM(path, device="cpu", runner="pooling", enable_lora=True, max_lora_rank=16, num_kv_blocks=64,
             max_num_batched_tokens=48, pooler_config={"pooling_type": "MEAN"}) as llm:
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts],
                         lora_request=[loras[n] if n else None for n in order])
    got = torch.tensor([o.outputs.embedding for o in outs])
    for name in (None, "qv8", "mlp16"):
        model = path if name is None else merge_adapter(path, adapters[name], str(tmp_path / f"merged-{name}"))
        rows = [i for i, n in enumerate(order) if n == name]
        ref = hf_embeddings(model, [prompts[i] for i in rows], "MEAN")
        torch.testing.assert_close(got[rows], ref, atol=5e-5, rtol=0)
    assert not torch.allclose(got[0], hf_embeddings(path, [prompts[0]], "MEAN")[0], atol=1e-3)  # qv8 moved it
