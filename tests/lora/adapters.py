"""Random PEFT LoRA adapters for the tiny test models, made with ``peft`` (never downloaded)."""

from __future__ import annotations

import os

# name -> (rank, target modules, extra LoraConfig arguments)
ADAPTERS = {
    "qv8": (8, ["q_proj", "v_proj"], dict(lora_alpha=16)),
    "kogate16": (16, ["k_proj", "o_proj", "gate_proj"], dict(lora_alpha=8, use_rslora=True)),
    "all32": (32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              dict(lora_alpha=64)),
}


def make_adapters(model_dir: str, root: str, seed: int = 0) -> dict[str, str]:
    """Save each adapter of ``ADAPTERS`` for the model in ``model_dir`` under ``root``; B is
    random too (``init_lora_weights=False``), so every adapter changes the tokens."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i, (name, (rank, targets, extra)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed + i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, target_modules=targets, init_lora_weights=False,
                            lora_dropout=0.0, **extra)
        model = get_peft_model(base, config)
        path = os.path.join(root, name)
        model.save_pretrained(path)
        paths[name] = path
    return paths


def peft_greedy(model_dir: str, adapter_dir, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy tokens of HF transformers with one adapter applied (None: the base model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs
