"""LoRA on the MoE experts (Mixtral, Qwen2-MoE with its shared expert and dense layer,
Qwen3-MoE, OLMoE): adapters on every expert's gate/up/down,
named as transformers 5 holds the experts (fused parameters, made with peft's
``target_parameters``) or per expert as transformers 4's ModuleList (``experts.<e>.w1`` /
``gate_proj``, written here and read by peft's own conversion), in one batch with an
attention-only adapter and the base model: greedy tokens and logprobs equal HF + peft's
(float32, tiny random models)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tessellm.lora import LoRARequest
from tests.lora.adapters import adapter_models, assert_mixed_batch_matches_peft, base_shapes
from tests.models.tiny_moe import prompts

FUSED = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SPECS = {
    family: {
        "fused8": (8, ["q_proj", "o_proj"], dict(lora_alpha=16, target_parameters=FUSED)),
        "attn4": (4, ["k_proj", "v_proj"], dict(lora_alpha=8)),
    } for family in ("mixtral", "qwen2-moe", "qwen3-moe", "olmoe")
}
# Qwen2-MoE: gate/up/down name the shared expert (layer 0) and the dense MLP (layer 1)
SPECS["qwen2-moe"]["mlp8"] = (8, ["gate_proj", "up_proj", "down_proj", "v_proj"],
                              dict(lora_alpha=16, target_parameters=FUSED))
# DeepSeek: the MLPs (dense layer 0, shared experts, routed experts) and MLA but kv_b_proj
for _ds in ("deepseek-v2", "deepseek-v3"):
    SPECS[_ds] = {"mlp8": (8, ["gate_proj", "up_proj", "down_proj"],  # strong: MLA dominates
                           dict(lora_alpha=128, target_parameters=FUSED)),
                  "experts4": (4, [], dict(lora_alpha=64, target_parameters=FUSED)),
                  "mla8": (8, ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"],
                           dict(lora_alpha=64))}
# V2-Lite: no q_lora, MLA's q_proj
SPECS["deepseek-v2-lite"] = {"mla8": (8, ["q_proj", "kv_a_proj_with_mqa", "o_proj"],
                                      dict(lora_alpha=64))}
# transformers 4 naming of one expert's projections (family -> (experts path, gate, up, down))
PER_EXPERT = {"mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2"),
              "qwen2-moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
              "qwen3-moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
              "olmoe": ("mlp.experts", "gate_proj", "up_proj", "down_proj")}


def _save(family: str, path: str) -> str:
    from tests.models.tiny_moe import save_tiny_moe

    if family.startswith("deepseek"):  # MLA; layer 0 dense, 8 experts + a shared one
        from tests.models.test_deepseek import deepseek_config, save_deepseek

        q_lora = None if family.endswith("lite") else 24
        return save_deepseek(deepseek_config(v3=family.endswith("v3"), q_lora_rank=q_lora), path)
    if family == "olmoe":  # 4 experts, q/k normed over all heads
        from tests.models.test_olmoe import olmoe_config
        from tests.models.variant_parity import save_tiny

        return save_tiny(olmoe_config(num_experts=6), path)
    return save_tiny_moe(family, path)


@pytest.fixture(scope="module")
def moe_setup(tmp_path_factory):
    get = adapter_models(tmp_path_factory, _save, SPECS, seed=5)

    def with_per_expert(family):
        model, paths = get(family)
        if "expert6" not in paths and family in PER_EXPERT:
            paths["expert6"] = write_per_expert_adapter(
                os.path.join(os.path.dirname(model), "expert6"), model, family, rank=6, alpha=12)
        return model, paths

    return with_per_expert


def write_per_expert_adapter(path: str, model_dir: str, family: str, rank: int, alpha: float,
                             seed: int = 3, experts=None) -> str:
    """A random adapter on each expert's three projections as transformers 4's PEFT names them
    (peft 0.18+ converts it onto transformers 5's fused experts on load); ``experts``: which
    experts (default all)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    hidden = config.hidden_size
    count = getattr(config, "num_local_experts", None) or config.num_experts
    qwen = family in ("qwen2-moe", "qwen3-moe")
    inter = config.moe_intermediate_size if qwen else config.intermediate_size
    where, gate, up, down = PER_EXPERT[family]
    shapes = {gate: (hidden, inter), up: (hidden, inter), down: (inter, hidden)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    dense = getattr(config, "mlp_only_layers", None) or []
    for layer in range(config.num_hidden_layers):
        if layer in dense:  # no experts there
            continue
        for e in range(count) if experts is None else experts:
            for part, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{where}.{e}.{part}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none",
                   "target_modules": [gate, up, down]}, f)
    return path


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe", "qwen3-moe",
                                    pytest.param("olmoe", marks=pytest.mark.slow)])  # Qwen's names
def test_expert_lora_mixed_batch_matches_peft(moe_setup, family):
    """Fused-parameter and per-expert adapters, an attention-only one and the base model, in
    one batch of two slots (three adapters: they take turns); Qwen2-MoE adds one on the shared
    expert, the dense layer's MLP and the experts."""
    from transformers import AutoConfig

    model, paths = moe_setup(family)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    names = [None, "fused8", "expert6", "attn4"]
    if family == "qwen2-moe":  # peft does not convert per-expert Qwen2-MoE adapters (it warns and
        names[2] = "mlp8"  # leaves them out): the same naming as Qwen3-MoE's, tested there
    assert_mixed_batch_matches_peft(model, paths, prompts(vocab), names, 6, family)


def test_expert_lora_logprobs_match_peft(moe_setup):
    from tessellm import LLM, SamplingParams
    from tests.lora.test_lora_combos import _peft_logprobs

    model, paths = moe_setup("qwen3-moe")
    prompt = prompts()[1]
    llm = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=2)
    try:
        out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
            max_tokens=5, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1),
            use_tqdm=False, lora_request=LoRARequest("e", 1, paths["expert6"]))[0]
    finally:
        llm.shutdown()
    tokens = out.outputs[0].token_ids
    ref = _peft_logprobs(model, paths["expert6"], prompt, tokens)
    for j, (tok, entry) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert entry[tok].rank == 1 and int(row.argmax()) == tok
        for t, lp in entry.items():
            assert abs(lp.logprob - row[t].item()) < 1e-4, (j, t)
    for j in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[j][prompt[j]].logprob - ref[j - 1][prompt[j]].item()) < 1e-4


def test_adapters_read_into_stacked_experts(moe_setup, tmp_path):
    """Both namings land in one stacked module per layer; experts an adapter leaves alone
    are zeros; a fused adapter's one A serves gate and up."""
    from tessellm.lora.peft import load_adapter

    model, paths = moe_setup("mixtral")
    base = base_shapes(model)
    fused = load_adapter(LoRARequest("f", 1, paths["fused8"]), base, 8)
    stacked = fused.modules[(1, "experts")]
    assert tuple(stacked.a["gate"].shape) == (8, 8, 64) and tuple(stacked.b["down"].shape) == (8, 64, 8)
    assert torch.equal(stacked.a["gate"], stacked.a["up"])
    assert stacked.scaling == 2.0 and (0, "q_proj") in fused.modules
    some = write_per_expert_adapter(str(tmp_path / "some"), model, "mixtral", 4, 4, experts=[2, 5])
    partial = load_adapter(LoRARequest("p", 2, some), base, 8).modules[(0, "experts")]
    assert partial.rank == 4 and partial.scaling == 1.0
    norms = partial.b["up"].flatten(1).norm(dim=1)
    assert (norms[[2, 5]] > 0).all() and (norms[[0, 1, 3, 4, 6, 7]] == 0).all()


@pytest.mark.parametrize("bad,match", [
    ("expert9", r"adapts expert 9 .*the base model's layers have 8 experts"),
    ("rank", r"rank 6 at model\.layers\.0\.block_sparse_moe\.experts\.0\.w1, above "
             r"max_lora_rank 4; start the engine with --max-lora-rank 8"),
    ("shape", r"maps 64 -> 50 features but the base model's expert .*w1 maps 64 -> 96"),
])
def test_bad_expert_adapters_are_refused(moe_setup, tmp_path, bad, match):
    from safetensors.torch import load_file, save_file

    from tessellm.lora.peft import load_adapter

    model, paths = moe_setup("mixtral")
    max_rank = 4 if bad == "rank" else 8
    path = write_per_expert_adapter(str(tmp_path / bad), model, "mixtral", 6, 12,
                                    experts=[9] if bad == "expert9" else [0])
    if bad == "shape":
        file = os.path.join(path, "adapter_model.safetensors")
        tensors = load_file(file)
        key = "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_B.weight"
        tensors[key] = tensors[key][:50]
        save_file(tensors, file)
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(LoRARequest("x", 1, path), base_shapes(model), max_rank)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_triton_expert_lora_mixed_batch(moe_setup):
    """The cuda backend's Triton ops (fused MoE and its expert LoRA kernels) emulated on the
    CPU: a mixed batch's greedy tokens equal HF + peft's (float32)."""
    from tessellm import LLM, SamplingParams
    from tests.lora.adapters import peft_greedy

    model, paths = moe_setup("mixtral")
    names, prompt_ids = ["fused8", None, "expert6"], prompts()[:3]
    llm = LLM(model, device="cuda", emulate=True, dtype="float32", enable_lora=True,
              max_lora_rank=8, max_loras=2)
    try:
        ops = llm.engine.core.runner.lora.batch.ops
        assert ops.supports_graph_capture and type(ops._inner).__name__ == "TritonLoRAOps"
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids],
                            SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                            use_tqdm=False,
                            lora_request=[LoRARequest(n, i + 1, paths[n]) if n else None
                                          for i, n in enumerate(names)])
    finally:
        llm.shutdown()
    for out, prompt, name in zip(outs, prompt_ids, names):
        want = peft_greedy(model, paths[name] if name else None, [prompt], 4)[0]
        assert out.outputs[0].token_ids == want, name


@pytest.mark.slow
@pytest.mark.parametrize("family,parallel", [
    ("mixtral", dict(tensor_parallel_size=2)),
    ("mixtral", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    ("deepseek-v2", dict(tensor_parallel_size=2))])
def test_parallel_expert_lora_matches_peft(moe_setup, family, parallel):
    """TP=2 (each rank's slice of every expert: gate/up B rows and down A columns cut like the
    weights; DeepSeek's replicated q_a / kv_a whole, q_b per head) and expert parallelism
    (each rank's experts' slots): HF + peft's tokens."""
    from tests.lora.adapters import mixed_batch, peft_greedy

    model, paths = moe_setup(family)
    names = ["fused8", "expert6", None] if family == "mixtral" else ["mla8", "mlp8", None]
    jobs, got = mixed_batch(model, paths, prompts(128)[:2], names, 4, device="cpu",
                            num_kv_blocks=64, **parallel)
    want = {n: peft_greedy(model, paths[n] if n else None, prompts(128)[:2], 4) for n in names}
    for (p, name), tokens in zip(jobs, got):
        assert tokens == want[name][p], (name, p)


def test_quantized_model_refuses_expert_adapters(moe_setup):
    """fp8 experts have no LoRA slots: an adapter with expert weights is refused when read,
    one for the attention still loads."""
    from transformers import AutoConfig

    from tessellm.lora.peft import load_adapter
    from tessellm.lora.shapes import BaseShapes

    model, paths = moe_setup("qwen3-moe")
    base = BaseShapes.from_config(AutoConfig.from_pretrained(model), "fp8")
    with pytest.raises(ValueError, match=r"adapts mlp\.experts\.0\.\w+_proj \(layer 0\), which "
                                         r"Qwen3MoeForCausalLM has no LoRA support for; .*the "
                                         r"experts of a quantized model take no LoRA"):
        load_adapter(LoRARequest("x", 1, paths["expert6"]), base, 8)
    assert (0, "k_proj") in load_adapter(LoRARequest("a", 2, paths["attn4"]), base, 8).modules


def test_deepseek_v2_lite_q_proj_lora_matches_peft(moe_setup):
    """V2-Lite's MLA has q_proj (no q_lora): an adapter on it, kv_a and o."""
    model, paths = moe_setup("deepseek-v2-lite")
    assert_mixed_batch_matches_peft(model, paths, prompts(128), [None, "mla8"], 6, "v2-lite")


@pytest.mark.parametrize("family", ["deepseek-v2",
                                    pytest.param("deepseek-v3", marks=pytest.mark.slow)])
def test_deepseek_mlp_and_expert_lora_matches_peft(moe_setup, family):
    """DeepSeek: the latent attention's q_a / q_b / kv_a / o projections, the dense layer's MLP,
    the shared experts and the routed experts (routed by DeepSeek's own grouped top-k,
    ``FusedMoE.forward_routed``), adapters and the base model in one batch; an adapter on
    kv_b_proj is refused naming what is served."""
    from transformers import AutoConfig

    from tessellm import LLM, SamplingParams
    from tessellm.lora.peft import load_adapter
    from tests.lora.adapters import make_adapters, merged_greedy

    model, paths = moe_setup(family)
    config = AutoConfig.from_pretrained(model)
    # peft on transformers 5 turns gate/up/down targets into the fused experts' parameters
    # (gate_up_proj at twice the rank and alpha: rank_pattern / alpha_pattern)
    assert_mixed_batch_matches_peft(model, {n: paths[n] for n in ("mlp8", "experts4", "mla8")},
                                    prompts(config.vocab_size), [None, "mlp8", "experts4",
                                                                 "mla8"], 6, family)
    # the dense layer's MLP and the shared experts, written by hand: HF with them merged
    shared = _write_dense_and_shared(os.path.dirname(paths["mlp8"]) + "/shared", config)
    llm = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=8, max_loras=1)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts(config.vocab_size)],
                            SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                            use_tqdm=False, lora_request=LoRARequest("s", 9, shared))
    finally:
        llm.shutdown()
    want = merged_greedy(model, shared, prompts(config.vocab_size), 6, "cpu", torch.float32)
    assert want != merged_greedy(model, None, prompts(config.vocab_size), 6, "cpu", torch.float32)
    assert [o.outputs[0].token_ids for o in outs] == want
    if family.endswith("v3"):
        return
    mla = make_adapters(model, os.path.dirname(paths["mlp8"]) + "/mla",
                        specs={"q": (4, ["q_a_proj", "kv_b_proj"], {})})["q"]
    with pytest.raises(ValueError, match=r"adapts self_attn\.kv_b_proj \(layer 0\), which "
                                         r"DeepseekV2ForCausalLM has no LoRA support for; it "
                                         r"supports q_proj, q_a_proj, .*not kv_b_proj"):
        load_adapter(LoRARequest("m", 1, mla), base_shapes(model), 8)


def _write_dense_and_shared(path: str, config) -> str:
    """Layer 0's dense MLP and layer 1's shared experts, rank 8 (DeepSeek's tiny model)."""
    from safetensors.torch import save_file

    hidden, dense = config.hidden_size, config.intermediate_size
    shared = config.n_shared_experts * config.moe_intermediate_size
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for layer, where, inter in ((0, "mlp", dense), (1, "mlp.shared_experts", shared)):
        for part, (fan_in, fan_out) in {"gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                                        "down_proj": (inter, hidden)}.items():
            key = f"base_model.model.model.layers.{layer}.{where}.{part}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, 8, generator=g) * 0.5
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 8, "lora_alpha": 32, "bias": "none",
                   "target_modules": ["gate_proj", "up_proj", "down_proj"]}, f)
    return path
