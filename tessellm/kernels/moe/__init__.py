"""Fused Mixture-of-Experts: expert-sorted token blocks and a grouped GEMM over them."""

from tessellm.kernels.moe.align import align_by_expert
from tessellm.kernels.moe.fused_moe import fused_moe, fused_moe_triton, topk_routing

__all__ = ["align_by_expert", "fused_moe", "fused_moe_triton", "topk_routing"]
