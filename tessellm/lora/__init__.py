"""Multi-LoRA serving: PEFT adapters on one base model, batched in one step (docs/lora.md)."""

from tessellm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
