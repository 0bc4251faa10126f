"""AWQ and GPTQ int4 checkpoints of the hybrid recurrent-state models (Qwen3-Next, Granite
4.0-H): the linear projections (Mamba ``in_proj`` / ``out_proj``, the DeltaNet ``in_proj_qkvz``
/ ``out_proj``, attention, MLPs and MoE experts) served from their packed codes, the recurrent
kernels' small parameters (conv1d, A_log, D, dt_bias, the gated norm) in the model dtype.

Checkpoints are written the way ``test_loading.py`` writes int4 ones (random codes, zeros and
fp16 scales per group of inputs, packed in each format's layout) from tiny random HF models,
with the *dequantized* checkpoint beside them (each weight ``(q - zero) * scale``): served on
the cpu backend (float32), the int4 checkpoint gives the greedy tokens of the dequantized one
served by tessellm and by HF transformers. The stored multi-part tensors (a Mamba ``in_proj``
[z | x | B | C | dt], a DeltaNet ``in_proj_qkvz`` grouped by key head, Granite's fused shared
MLP) are cut by output columns, in 8-column words where the format packs along the outputs
(``quantization/stored_parts.py``): a wrong cut gives other tokens. A part that ends inside a
packed word (Qwen3-Next-80B's ``in_proj_ba``: [b 2 | a 2] per key head) is refused naming the
layer. Qwen3-Next's tiny model here has dense MLPs (``mlp_only_layers``); its int4 MoE experts
(and Granite 4.0-H's float ones beside int4 projections) are served in ``test_moe_int4.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tessellm.quantization.int4 import pack_awq, pack_gptq_zeros
from tessellm.quantization.packed import pack_int4
from tests.quantization.block_fp8_checkpoint import build, generate
from tests.quantization.int4_checkpoint import GROUP, write_int4

PROMPTS = [[5, 17, 42, 99, 3, 120], list(range(40, 60))]
# three tokens: the prefill's (the tiled int4 GEMM) and two decode steps (the int4 GEMV at two
# rows, the second reading the recurrent state the first wrote); each interpreted decode step is
# most of these tests' time
MAX_NEW = 3
# int4 GEMMs are the cuda backend's here (Triton, interpreted on host tensors); the cpu
# backend's int4 path on a hybrid runs in test_falcon_h1_quant.py
CUDA_EMULATED = dict(device="cuda", emulate=True)


def _configs():
    from transformers import GraniteMoeHybridConfig, Qwen3NextConfig

    common = dict(vocab_size=128, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1)
    return {
        # per key head: in_proj_qkvz [q 32 | k 32 | v 64 | z 64], in_proj_ba [b 8 | a 8] (whole
        # words of 8 outputs); dense MLPs (mlp_only_layers): int4 experts in test_moe_int4.py
        "qwen3-next": Qwen3NextConfig(**common, num_hidden_layers=2, head_dim=32,
                                      mlp_only_layers=[0, 1],
                                      linear_num_key_heads=2, linear_num_value_heads=16,
                                      linear_key_head_dim=32, linear_value_head_dim=8,
                                      linear_conv_kernel_dim=4, num_experts=4,
                                      num_experts_per_tok=2, intermediate_size=192,
                                      moe_intermediate_size=128,
                                      shared_expert_intermediate_size=128,
                                      layer_types=["linear_attention", "full_attention"]),
        # in_proj [z 128 | x 128 | B 64 | C 64 | dt 8]; the fused shared MLP [gate | up]
        "granite-4.0-h": GraniteMoeHybridConfig(**common, num_hidden_layers=3,
                                                intermediate_size=128,
                                                shared_intermediate_size=128,
                                                num_local_experts=0,
                                                layer_types=["mamba", "attention", "mamba"],
                                                mamba_n_heads=8, mamba_d_head=16,
                                                mamba_n_groups=1, mamba_d_state=64,
                                                mamba_d_conv=4, mamba_expand=1,
                                                mamba_chunk_size=8,
                                                position_embedding_type="rope"),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root, made = tmp_path_factory.mktemp("hybrid-int4"), {}

    def make(arch: str) -> dict:
        if arch not in made:
            torch.manual_seed(5)
            model = AutoModelForCausalLM.from_config(_configs()[arch], dtype=torch.float32)
            dense = str(root / f"{arch}-dense")
            model.save_pretrained(dense)
            made[arch] = write_int4(dense, root / arch, extra_packed=("in_proj_ba",))
            made[arch]["dense"] = dense
        return made[arch]

    return make


# interpreted Triton (decode attention, the recurrent kernels) is most of these tests' time:
# one format per model by default, the other under -m slow (``test_cut_by_columns_of_each_format``
# covers both formats' cut on every run)
@pytest.mark.parametrize("arch, fmt", [
    ("qwen3-next", "gptq"), ("granite-4.0-h", "awq"),
    pytest.param("qwen3-next", "awq", marks=pytest.mark.slow),
    pytest.param("granite-4.0-h", "gptq", marks=pytest.mark.slow)])
@pytest.mark.interpreted
def test_int4_hybrid_serves_the_dequantized_model(checkpoints, arch, fmt):
    """The int4 checkpoint's greedy tokens are the dequantized checkpoint's, served by tessellm
    and by HF transformers (float32)."""
    from tests.conftest import hf_greedy

    dirs = checkpoints(arch)
    want = generate(dirs["deq"], PROMPTS, MAX_NEW)
    assert want == hf_greedy(dirs["deq"], PROMPTS, MAX_NEW)
    assert generate(dirs[fmt], PROMPTS, MAX_NEW, **CUDA_EMULATED) == want


def test_int4_hybrid_keeps_the_recurrent_parameters_dense(checkpoints):
    """Each part of the cut in_proj holds int4 segments (AWQ: its 8-column words); conv1d,
    A_log, D, dt_bias and the gated norm stay float32 parameters."""
    from tessellm.layers.mamba_mixer import MambaMixer2

    model = build(checkpoints("granite-4.0-h")["awq"], backend="cuda")
    mixer = next(m for m in model.modules() if isinstance(m, MambaMixer2))
    assert {type(s).__name__ for s in mixer.in_proj.segments} == {"Int4Weight"}
    assert {type(s).__name__ for s in mixer.out_proj.segments} == {"Int4Weight"}
    small = dict(mixer.named_parameters())
    assert small and all(p.dtype == torch.float32 for p in small.values())


def test_packed_part_boundary_inside_a_word_is_refused(tmp_path):
    """in_proj_ba of two value heads a key head stores [b 2 | a 2] per key head (as
    Qwen3-Next-80B): packed 8 outputs a word (AWQ), a word would hold parts of both -> refused
    naming the layer."""
    from transformers import AutoModelForCausalLM

    config = _configs()["qwen3-next"]
    config.linear_num_value_heads, config.linear_value_head_dim = 4, 32
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "d")
    dirs = write_int4(str(tmp_path / "d"), tmp_path, fmts=("awq",),
                      extra_packed=("in_proj_ba",))
    with pytest.raises(ValueError, match=r"linear_attn\.in_proj_ba stores parts of \[2, 2\] "
                                         r"outputs in each of 2 groups in one AWQ int4 tensor"):
        build(dirs["awq"], backend="cuda")


def test_cut_by_columns_of_each_format():
    """split_rows on int4 tensors: GPTQ qweight / scales by columns, AWQ qweight and both
    formats' qzeros by 8-column words, g_idx whole; grouped (per key head) parts in group
    order."""
    from tessellm.quantization.stored_parts import split_rows

    q = torch.randint(0, 16, (32, 48))  # K=32, N=48: two groups of [8 | 16]
    a, b = split_rows("qweight", pack_awq(q), [8, 16], groups=2, packing="awq")
    assert torch.equal(a, pack_awq(torch.cat([q[:, :8], q[:, 24:32]], 1)))
    assert torch.equal(b, pack_awq(torch.cat([q[:, 8:24], q[:, 32:]], 1)))
    a, b = split_rows("qweight", pack_int4(q), [8, 16], groups=2, packing="gptq")
    assert torch.equal(a, pack_int4(torch.cat([q[:, :8], q[:, 24:32]], 1)))
    s = torch.randn(1, 48)
    a, b = split_rows("scales", s, [8, 16], groups=2, packing="gptq")
    assert torch.equal(b, torch.cat([s[:, 8:24], s[:, 32:]], 1))
    g_idx = torch.zeros(32, dtype=torch.int32)
    assert all(t is g_idx for t in split_rows("g_idx", g_idx, [8, 16], 2, packing="gptq"))
    with pytest.raises(ValueError, match="layers.0.x stores parts of \\[4, 20\\] outputs in one "
                                         "GPTQ int4 tensor"):
        split_rows("qzeros", pack_gptq_zeros(q[:1, :24]), [4, 20], where="layers.0.x",
                   packing="gptq")


def test_gptq_act_order_is_refused():
    """GPTQ act-order (desc_act) on a hybrid model: refused at engine start, before any worker."""
    from types import SimpleNamespace

    from tessellm.models.state_space import check_engine_args

    config = _configs()["granite-4.0-h"]
    config.architectures = ["GraniteMoeHybridForCausalLM"]
    config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                  "desc_act": True}
    with pytest.raises(ValueError, match=r"does not support GPTQ act-order \(desc_act\) yet"):
        check_engine_args(SimpleNamespace(quantization=None), config)
    config.quantization_config["desc_act"] = False
    check_engine_args(SimpleNamespace(quantization=None), config)
