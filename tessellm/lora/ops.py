"""The batched LoRA ops the layers call: the backend's ``tessellm_lora_ops`` (checked), else
the pure-torch reference (``registry.lora_ops``; the contract is ``LoRAOps`` in backends/spec.py)."""

from __future__ import annotations


def lora_ops_for(registry, backend, dtype, max_loras: int, max_rank: int, device):
    from tessellm.backends.spec import LoRAOpsSpec

    return registry.lora_ops(backend, LoRAOpsSpec(dtype=dtype, max_loras=max_loras,
                                                  max_rank=max_rank, device=device))
