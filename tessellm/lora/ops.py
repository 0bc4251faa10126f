"""The batched LoRA ops the layers call, from the backend's ``tessellm_lora_ops`` hook.

Until the hook lands in the contract this module carries a pure-torch stand-in with the agreed
signature (``prepare`` / ``shrink`` / ``expand``); ``lora_ops_for`` prefers the backend's.
"""

from __future__ import annotations

import torch


class StandInLoRAOps:
    """Per token row ``t`` with slot ``s = token_slots[t]`` (-1: no adapter)::

        shrink:  out[t, :]              = x[t] @ lora_a[s].T                 (fp32)
        expand:  out[t, off:off + N]   += scaling[s] * buf[t] @ lora_b[s].T
    """

    name = "lora-standin"

    def prepare(self, token_slots: torch.Tensor, num_slots: int):
        return token_slots.long()

    def shrink(self, x, lora_a, meta, out):
        slots = meta.clamp(min=0)
        y = torch.bmm(lora_a[slots].float(), x.float().unsqueeze(-1)).squeeze(-1)
        out.copy_(y * (meta >= 0).unsqueeze(-1))

    def expand(self, buf, lora_b, meta, scaling, out, out_offset):
        slots = meta.clamp(min=0)
        y = torch.bmm(lora_b[slots].float(), buf.float().unsqueeze(-1)).squeeze(-1)
        y = y * (scaling[slots] * (meta >= 0)).unsqueeze(-1)
        n = lora_b.shape[1]
        out[:, out_offset:out_offset + n] += y.to(out.dtype)


def lora_ops_for(registry, backend, dtype, max_loras: int, max_rank: int, device):
    """The backend's LoRA ops (``tessellm_lora_ops``, checked), else the pure-torch reference."""
    lora_ops = getattr(registry, "lora_ops", None)
    if lora_ops is None:  # a contract without the hook yet
        return StandInLoRAOps()
    from tessellm.backends.spec import LoRAOpsSpec

    return lora_ops(backend, LoRAOpsSpec(dtype=dtype, max_loras=max_loras, max_rank=max_rank,
                                         device=device))
