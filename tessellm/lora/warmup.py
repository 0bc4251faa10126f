"""The serving warm-up's LoRA part: a zero adapter through the same prefill and decode shapes,
so the backend's LoRA kernels are compiled before ``/ready``.

The adapter is rank 1 on every projection the family's LoRA covers (a slot is ``max_lora_rank``
wide whatever the adapter's rank, so the kernels see the shapes real adapters give them), all
zeros (it changes nothing), written to a temporary directory so worker processes can read it
too; it is forgotten (slot, host caches, files) afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

WARMUP_LORA_ID = 2 ** 31 - 1


def write_zero_adapter(path: str, base) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for layer in range(base.num_layers):
        for module in base.modules:
            fan_in, fan_out = base.peft_shape(module)
            key = f"base_model.model.{base.layer_prefix}.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.zeros(1, fan_in)
            tensors[f"{key}.lora_B.weight"] = torch.zeros(fan_out, 1)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "bias": "none"}, f)


def lora_warmup(core, run_shapes) -> None:
    """``run_shapes(lora_dict)``: the warm-up's prefill and decode shapes with that adapter."""
    store = getattr(core, "lora_store", None)
    if store is None:
        return
    from tessellm.lora.request import LoRARequest

    path = tempfile.mkdtemp(prefix="tessellm-lora-warmup-")
    try:
        write_zero_adapter(path, store.base)
        lora = LoRARequest("__warmup__", WARMUP_LORA_ID, path)
        store.load_now(lora)
        run_shapes(lora.to_dict())
        core.scheduler.lora.drop(WARMUP_LORA_ID)
    finally:
        shutil.rmtree(path, ignore_errors=True)
