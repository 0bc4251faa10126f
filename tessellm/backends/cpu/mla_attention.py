"""Multi-head latent attention (``AttentionSpec.mla_value_size``, DeepSeek-V2/V3) on the cpu
backend: the cpu paged attention (``attention.py``) run as multi-query attention over the latent
cache, with the cache serving as both keys and values and the output cut to the value width::

    k_cache row:  [ c_kv (Dv) | k_pe ]     keys = rows, values = rows (the same tensor)
    out = softmax(scale * q . rows) @ rows  ->  [..., :Dv]

The value product runs over the whole row (``D``, 576 for the released models, against ``Dv``
512: an eighth more of that half of the work) so that every path of the cpu kernel (decode
groups, the C decode kernel, short queries, captured steps) serves it unchanged; the cache holds
each row once. This step's rows are written once per forward call by that kernel's cache write
(as its k and, with the same values, its v).
"""

from __future__ import annotations

from tessellm.backends.cpu.attention import CpuAttentionKernel


class CpuMLAAttentionKernel(CpuAttentionKernel):
    name = "cpu-sdpa-mla"
    supports_mla = True
    supports_sliding_window = False

    def __init__(self, spec):
        if spec.num_kv_heads != 1:
            raise ValueError(f"MLA caches one latent row per token (num_kv_heads 1), got "
                             f"{spec.num_kv_heads}.")
        super().__init__(spec)
        self.value_size = spec.mla_value_size

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale):
        out = super().forward(q, k, k, k_cache, k_cache, metadata, scale)
        return out[..., :self.value_size]
