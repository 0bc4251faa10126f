"""Pure-torch batched LoRA ops: the oracle of the conformance suite and the fallback of any backend
that does not provide ``tessellm_lora_ops`` (the cpu backend uses it as is).

Rows are grouped by slot once per step (``prepare``: one host read of the slots), then every
layer's shrink/expand is one dense product per adapter present in the batch::

    token_slots  [ 2 -1  0  2  2 ]      groups: slot 0 -> rows [2], slot 2 -> rows [0 3 4]
    shrink:  out[rows] = x[rows] @ lora_a[s].T            (float32), rows with -1 get 0
    expand:  out[rows, off:off+N] += scaling[s] * buf[rows] @ lora_b[s].T   (float32, rounded once)

Not graph-capturable (``prepare`` reads the slots on the host); on a 2-core CPU it is also the
fastest path measured (one GEMM per adapter, no per-row gather of the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessellm.kernels.op_flags import LORA_OPS_FLAGS, drop_unowned_flags


@dataclass
class ReferenceLoRAMeta:
    token_slots: torch.Tensor  # int32 [T], -1 = no adapter
    num_slots: int
    # (slot, rows): rows an int64 index tensor, or None when the slot covers every row (0..T-1).
    groups: list


def check_slots(token_slots: torch.Tensor, num_slots: int) -> None:
    """Shape/dtype of ``prepare``'s input (no host read: cheap enough for every backend)."""
    if token_slots.dim() != 1 or token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_slots must be a 1-D int32 tensor, got {token_slots.dtype} "
                         f"{tuple(token_slots.shape)}.")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}.")


class ReferenceLoRAOps:
    name = "reference"
    supports_graph_capture = False

    def __init_subclass__(cls, **kwargs):
        """A subclass that defines one of ``prepare`` / ``shrink`` / ``expand`` /
        ``expand_slices`` / ``fused_experts_lora`` itself captures only if it says so
        (``supports_graph_capture`` in its own body; ``op_flags.LORA_OPS_FLAGS``)."""
        super().__init_subclass__(**kwargs)
        drop_unowned_flags(cls, LORA_OPS_FLAGS)

    def fused_experts_lora(self, hidden, topk_weights, topk_ids, w13, w2, token_slots, lora,
                           **variant):
        """MoE experts with each token's adapter (``moe_lora.py``)."""
        from tessellm.backends.reference.moe_lora import fused_experts_lora_reference

        return fused_experts_lora_reference(hidden, topk_weights, topk_ids, w13, w2, token_slots,
                                            lora, **variant)

    def prepare(self, token_slots: torch.Tensor, num_slots: int) -> ReferenceLoRAMeta:
        check_slots(token_slots, num_slots)
        slots = token_slots.to(torch.int64)
        groups = []
        if slots.numel():
            host = slots.cpu()
            if int(host.min()) < -1 or int(host.max()) >= num_slots:
                raise ValueError(f"token_slots must lie in [-1, {num_slots}), got values in "
                                 f"[{int(host.min())}, {int(host.max())}].")
            present = torch.unique(host[host >= 0]).tolist()
            for s in present:
                rows = torch.nonzero(host == s).squeeze(1)
                every = rows.numel() == host.numel()
                groups.append((s, None if every else rows.to(token_slots.device)))
        return ReferenceLoRAMeta(token_slots, num_slots, groups)

    def shrink(self, x: torch.Tensor, lora_a: torch.Tensor, meta: ReferenceLoRAMeta,
               out: torch.Tensor) -> None:
        out.zero_()
        for s, rows in meta.groups:
            xs = x if rows is None else x.index_select(0, rows)
            part = xs.float() @ lora_a[s].float().t()
            if rows is None:
                out.copy_(part)
            else:
                out.index_copy_(0, rows, part)

    def expand(self, buf: torch.Tensor, lora_b: torch.Tensor, meta: ReferenceLoRAMeta,
               scaling: torch.Tensor, out: torch.Tensor, out_offset: int = 0) -> None:
        n = lora_b.shape[1]
        cols = out[:, out_offset:out_offset + n]
        for s, rows in meta.groups:
            bs = buf if rows is None else buf.index_select(0, rows)
            delta = (bs.float() @ lora_b[s].float().t()) * scaling[s].float()
            if rows is None:
                cols.copy_((cols.float() + delta).to(out.dtype))
            else:
                summed = cols.index_select(0, rows).float() + delta
                cols.index_copy_(0, rows, summed.to(out.dtype))

    def expand_slices(self, buf: torch.Tensor, lora_bs, meta: ReferenceLoRAMeta,
                      scaling: torch.Tensor, out: torch.Tensor, offsets) -> None:
        r = lora_bs[0].shape[2]
        for i, (lora_b, offset) in enumerate(zip(lora_bs, offsets)):
            self.expand(buf[:, i * r:(i + 1) * r], lora_b, meta, scaling, out, offset)
