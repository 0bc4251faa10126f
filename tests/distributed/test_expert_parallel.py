"""Expert parallelism (``enable_expert_parallel``, ``layers/moe.py``): the routed experts split
by expert over the tensor-parallel ranks, attention and shared experts still sliced.

In-process (layers take their rank as an argument; loading needs no process group): each rank
holds exactly its experts, whole, read from per-expert and stacked checkpoints, and the ranks'
MoE partial sums add up to the single-device layer. Over gloo (mp executor, two ranks): greedy
tokens equal HF transformers' in float32, and the same model's tokens without expert
parallelism. Refusals: one rank, experts that do not split, a model without experts, a family
that keeps its experts sliced, a fused MoE op that does not declare ``fused_moe_expert_map``."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessellm import LLM, SamplingParams
from tessellm.backends.registry import get_registry
from tessellm.config import EngineArgs, resolve_model
from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.moe import FusedMoE
from tessellm.loader.model_loader import build_model
from tests.conftest import hf_greedy
from tests.models.tiny_moe import prompts, save_tiny_moe

MAX_NEW = 16


def _build(path: str, tp: TensorParallel, expert_parallel: bool):
    registry = get_registry()
    model, _ = build_model(resolve_model(path), "safetensors", registry, registry.select("cpu"),
                           torch.float32, torch.device("cpu"), 16, tp=tp,
                           expert_parallel=expert_parallel)
    return model


def _checkpoint(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in glob.glob(f"{path}/*.safetensors"):
        tensors.update({k.removeprefix("model."): v for k, v in load_file(f).items()})
    return tensors


def _stack_experts(path: str, out: str, num_experts: int) -> str:
    """The checkpoint with each layer's experts in two stacked tensors (Llama 4's / Qwen3-VL-
    MoE's orientation: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``)."""
    os.makedirs(out)
    tensors = {}
    for f in glob.glob(f"{path}/*.safetensors"):
        tensors.update(load_file(f))
    layers = {k.split(".mlp.experts.")[0] for k in tensors if ".mlp.experts." in k}
    for layer in layers:
        pre = f"{layer}.mlp.experts"
        take = lambda e, p: tensors.pop(f"{pre}.{e}.{p}.weight")  # noqa: E731
        experts = range(num_experts)
        tensors[f"{pre}.gate_up_proj"] = torch.stack(
            [torch.cat([take(e, "gate_proj"), take(e, "up_proj")]).t() for e in experts])
        tensors[f"{pre}.down_proj"] = torch.stack([take(e, "down_proj").t() for e in experts])
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/model.safetensors",
              metadata={"format": "pt"})
    for f in glob.glob(f"{path}/*.json"):
        if not f.endswith("index.json"):
            with open(f) as src, open(f"{out}/{os.path.basename(f)}", "w") as dst:
                dst.write(src.read())
    return out


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return save_tiny_moe("qwen3-moe", str(tmp_path_factory.mktemp("ep") / "qwen3-moe"))


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
def test_each_rank_holds_its_experts_whole(qwen3_moe, tmp_path, layout):
    """8 experts over 2 ranks: rank r's w13 / w2 are experts 4r..4r+3 of the checkpoint,
    whole (intermediate 48 not sliced), its expert_map points at them; the router and
    attention are as without expert parallelism. Both ranks' MoE outputs sum to the
    single-device layer's."""
    full = _checkpoint(qwen3_moe)
    path = (qwen3_moe if layout == "per-expert"
            else _stack_experts(qwen3_moe, str(tmp_path / "stacked"), 8))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    one = _build(path, TensorParallel(), False).layers[0].mlp
    parts = []
    for rank in range(2):
        model = _build(path, TensorParallel(rank, 2), True)
        moe = model.layers[0].mlp
        experts = moe.experts
        assert experts.expert_ids == range(4 * rank, 4 * rank + 4)
        assert experts.w13.shape == (4, 2 * 48, 64) and experts.w2.shape == (4, 64, 48)
        want_map = [-1] * 8
        want_map[4 * rank:4 * rank + 4] = range(4)
        assert experts.expert_map.tolist() == want_map
        for local, e in enumerate(experts.expert_ids):
            pre = f"layers.0.mlp.experts.{e}"
            assert torch.equal(experts.w13[local], torch.cat([full[f"{pre}.gate_proj.weight"],
                                                              full[f"{pre}.up_proj.weight"]]))
            assert torch.equal(experts.w2[local], full[f"{pre}.down_proj.weight"])
        assert torch.equal(moe.gate.weight, full["layers.0.mlp.gate.weight"])
        q = model.layers[0].self_attn.qkv_proj.weight  # attention: still this rank's heads
        assert q.shape[0] == (4 * 32 + 2 * 2 * 32) // 2
        with torch.no_grad():
            parts.append(moe(x))
    with torch.no_grad():
        torch.testing.assert_close(parts[0] + parts[1], one(x), rtol=1e-5, atol=1e-6)


def test_mixtral_partial_sums_add_up(tmp_path):
    """Mixtral (``block_sparse_moe``, w1/w3/w2 names): each rank's half of the experts gives a
    partial sum; the two add up to the single-device layer's output."""
    path = save_tiny_moe("mixtral", str(tmp_path / "mixtral"))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _build(path, TensorParallel(), False).layers[1].mlp(x)
        got = sum(_build(path, TensorParallel(r, 2), True).layers[1].mlp(x) for r in range(2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _greedy(path: str, batch: list[list[int]], **engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    with LLM(path, device="cpu", dtype="float32", num_kv_blocks=64, seed=0,
             tensor_parallel_size=2, **engine) as llm:
        assert len(llm.engine.core.executor.worker_info) == 2
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_qwen3_moe_tp2_expert_parallel_matches_hf_and_tp(qwen3_moe):
    want = hf_greedy(qwen3_moe, prompts(), MAX_NEW)
    assert _greedy(qwen3_moe, prompts(), enable_expert_parallel=True) == want
    assert _greedy(qwen3_moe, prompts()) == want


def test_deepseek_v2_lite_tp2_expert_parallel_matches_hf(tmp_path):
    """DeepSeek-V2-Lite's shape (no q_lora, one shared expert, layer 0 dense): the routed
    experts split by expert, the shared expert sliced, MLA's heads split."""
    from tests.models.test_deepseek import deepseek_config, save_deepseek

    path = save_deepseek(deepseek_config(False), str(tmp_path / "ds"))
    batch = prompts(vocab=128)
    assert _greedy(path, batch, enable_expert_parallel=True,
                   max_num_batched_tokens=16) == hf_greedy(path, batch, MAX_NEW)


def test_expert_parallel_refusals(qwen3_moe, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="tensor_parallel_size is 1"):
        EngineArgs(model=qwen3_moe, enable_expert_parallel=True).validate()
    with pytest.raises(ValueError, match="6 routed experts to split evenly over "
                                         "tensor_parallel_size 4"):
        FusedMoE(6, 16, 8, 2, None, tp=TensorParallel(0, 4), expert_parallel=True)

    class OldPluginOps:  # an API 11 plugin's ops: a fused_moe without the flag
        def fused_moe(self, *a, **k):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="does not declare fused_moe_expert_map"):
        FusedMoE(8, 16, 8, 2, OldPluginOps(), tp=TensorParallel(0, 2), expert_parallel=True)
    with pytest.raises(ValueError, match="has no routed experts"):
        _build(tiny_model_dir("llama"), TensorParallel(0, 2), True)
    from tests.models.test_phimoe import phimoe_config
    from tests.models.variant_parity import save_tiny

    phimoe = save_tiny(phimoe_config(), str(tmp_path / "phimoe"))  # its experts only slice
    with pytest.raises(ValueError, match="Expert parallelism is not supported for "
                                         "PhimoeForCausalLM yet"):
        _build(phimoe, TensorParallel(0, 2), True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_tp2_expert_parallel_matches_hf(qwen3_moe):
    """Two GPUs (NCCL, CUDA graphs per rank, the Triton fused MoE with its expert_map):
    float32 greedy tokens equal HF's."""
    want = hf_greedy(qwen3_moe, prompts(), MAX_NEW)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    with LLM(qwen3_moe, device="cuda", dtype="float32", num_kv_blocks=64, seed=0,
             tensor_parallel_size=2, enable_expert_parallel=True,
             max_num_batched_tokens=24) as llm:
        assert llm.engine.core.executor.worker_info[0]["graphs"]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == want
