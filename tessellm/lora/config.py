"""LoRA serving limits, from ``EngineArgs`` (``--max-loras``, ``--max-cpu-loras``, ``--max-lora-rank``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 4  # adapters on the device at once (slots); a step never holds more
    max_cpu_loras: int = 8  # adapters kept parsed in host memory (>= max_loras)
    max_lora_rank: int = 64  # the slots' rank; an adapter of a lower rank is zero-padded

    @staticmethod
    def from_args(args) -> Optional["LoRAConfig"]:
        """None unless ``args.enable_lora``; refuses limits that cannot work."""
        if not getattr(args, "enable_lora", False):
            return None
        max_loras = args.max_loras
        max_cpu = args.max_cpu_loras if args.max_cpu_loras is not None else max(max_loras, 8)
        if max_cpu < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu}) is smaller than max_loras ({max_loras}); "
                             "the CPU cache must hold at least every adapter in a slot.")
        return LoRAConfig(max_loras, max_cpu, args.max_lora_rank)
