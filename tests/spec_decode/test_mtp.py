"""MTP speculative decoding (``method: "mtp"``): the target checkpoint's own multi-token
prediction module drafts (``tessellm/models/mtp.py``, ``tessellm/spec_decode/mtp.py``), on
tiny random DeepSeek-V3 (MLA + MoE) and GLM-4.5 (GQA + MoE) checkpoints built from HF configs
with MTP tensors added (``mtp_checkpoints.py``).

- the MTP module's forward equals the formula of the DeepSeek-V3 report, written here in
  torch around HF's own decoder layer (HF has no MTP forward);
- greedy tokens with MTP equal those without (k = 3 > the one MTP module: it is reused);
- a checkpoint built so the MTP module predicts the target exactly gets every draft accepted,
  seeded sampling keeps its tokens (the exact rejection sampler), and the Prometheus
  counters count the drafts;
- what cannot draft is refused in one sentence.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.models.test_deepseek import deepseek_config, save_deepseek
from tests.models.test_ernie4_5 import ernie4_5_moe_config
from tests.models.test_glm4_moe import glm4_moe_config
from tests.spec_decode.mtp_checkpoints import ernie_name, is_ernie, save_with_mtp

ENGINE = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16)
PROMPTS = [[5, 17, 42, 99, 3, 50, 11], [7, 7, 7, 12, 30, 7, 7, 12], list(range(10, 40))]
MTP = {"method": "mtp", "num_speculative_tokens": 3, "disable_by_batch_size": 0}
CONFIGS = {
    "deepseek-v3": lambda: deepseek_config(True, q_lora_rank=24),
    "glm4.5": lambda: glm4_moe_config(use_qk_norm=True, n_group=4, topk_group=2),
    "ernie4.5": lambda: ernie4_5_moe_config(use_bias=True),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtp")
    return {name: save_with_mtp(make(), str(root / name)) for name, make in CONFIGS.items()}


def _greedy(llm, max_tokens: int = 10) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _seeded(llm) -> list[list[int]]:
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=10,
                             ignore_eos=True) for i in range(len(PROMPTS))]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


# -- the module against the formula ----------------------------------------------------------

def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _reference(config, path: str, ids: list[int], layer_dir: str):
    """The MTP module at positions 0 .. L-2 of ``ids`` from the DeepSeek-V3 report's formula:
    ``h' = M [RMSNorm(Emb(t[i+1])) ; RMSNorm(h[i])]`` (embedding first, as the released weights
    are laid out), ``h = TRM(h')`` (HF's own decoder layer of index N), ``P = OutHead(h)`` (the
    shared head: RMSNorm, then the LM head; ERNIE: the target's final norm and LM head).
    ``h[i]``: HF's target, final norm included.
    Returns (target hidden [L-1, H], MTP output h [L-1, H], logits [L-1, V])."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    n, eps = config.num_hidden_layers, config.rms_norm_eps
    t = load_file(f"{path}/model.safetensors")
    pre = f"model.layers.{n}."
    if is_ernie(config):  # back to DeepSeek's names; ERNIE's output norm is the target's own
        ours = {ernie_name(pre + p + ".weight", n): pre + p + ".weight"
                for p in ("enorm", "hnorm", "eh_proj")}
        t = {ours.get(k, k): v for k, v in t.items()}
        t = {pre + k[len("model.mtp_block.0."):] if k.startswith("model.mtp_block.0.") else k: v
             for k, v in t.items()}
        t[pre + "shared_head.norm.weight"] = t["model.norm.weight"]
        t[pre + "shared_head.head.weight"] = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # HF with the MTP module's decoder layer as its layer N (HF reads the tensors its own way)
    big = copy.deepcopy(config)
    big.num_hidden_layers = n + 1
    if is_ernie(config):
        big.moe_layer_end_index = n - 1  # the MTP layer dense, as built
    big.save_pretrained(layer_dir)
    mtp_only = [pre + p for p in ("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens")]
    save_file({k: v for k, v in t.items() if not k.startswith(tuple(mtp_only))},
              f"{layer_dir}/model.safetensors", metadata={"format": "pt"})
    with_layer = AutoModelForCausalLM.from_pretrained(layer_dir, dtype=torch.float32,
                                                      attn_implementation="eager")
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        hidden = target.model(ids_t).last_hidden_state[0, :-1]  # h[i], i = 0 .. L-2
        embeds = t["model.embed_tokens.weight"][torch.tensor(ids[1:])]  # Emb(t[i+1])
        x = torch.cat([_rms(embeds, t[pre + "enorm.weight"], eps),
                       _rms(hidden, t[pre + "hnorm.weight"], eps)], dim=-1) @ t[pre + "eh_proj.weight"].T
        m = x.shape[0]
        positions = torch.arange(m)[None]
        mask = torch.full((m, m), float("-inf")).triu(1)[None, None]
        rope = with_layer.model.rotary_emb(x[None], positions)
        out = with_layer.model.layers[n](x[None], attention_mask=mask, position_ids=positions,
                                         position_embeddings=rope)
        out = (out[0] if isinstance(out, tuple) else out)[0]
        logits = _rms(out, t[pre + "shared_head.norm.weight"], eps) @ t[pre + "shared_head.head.weight"].T
        if "lm_head.bias" in t:  # ERNIE with use_bias: the LM head's bias
            logits = logits + t["lm_head.bias"]
    return hidden, out, logits


@pytest.mark.parametrize("family", list(CONFIGS))
def test_mtp_forward_matches_the_formula(checkpoints, family, tmp_path):
    from tessellm.backends.registry import BackendRegistry
    from tessellm.config import resolve_model
    from tessellm.loader.model_loader import build_model
    from tessellm.models.mtp import build_mtp_head
    from tessellm.spec_decode.draft_batch import Run, build_draft_batch

    path, config, block_size = checkpoints[family], CONFIGS[family](), 4
    ids = [5, 17, 42, 99, 3, 50, 11, 60, 8, 23, 77]
    hidden, want_out, want_logits = _reference(config, path, ids, str(tmp_path / "hf"))
    registry = BackendRegistry()
    backend, source = registry.backends["cpu"], resolve_model(path)
    target, _ = build_model(source, "safetensors", registry, backend, torch.float32,
                            torch.device("cpu"), block_size=block_size)
    head, kernel = build_mtp_head(target, source, registry, backend, block_size)
    assert head.own_head is None and head.own_embed is None  # equal copies: the target's shared
    attn = head.attention_layers()[0]
    shape = (8, block_size, attn.num_kv_heads, attn.head_size)
    attn.k_cache = torch.zeros(shape)
    attn.v_cache = torch.zeros(shape) if getattr(attn, "caches_values", True) else None
    batch = build_draft_batch([Run(ids[1:], 0, [0, 1, 2])], block_size, torch.device("cpu"))
    with torch.no_grad():
        normed, out = head(batch.input_ids, batch.positions,
                           kernel.build_metadata(batch.attention), hidden)
        logits = head.lm_head(normed)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert head.draft_tokens(normed).tolist() == want_logits.argmax(-1).tolist()


# -- the engine --------------------------------------------------------------------------------

@pytest.mark.parametrize("family, method", [("deepseek-v3", "mtp"), ("glm4.5", "glm4_moe_mtp"),
                                            ("ernie4.5", "ernie_mtp")])
def test_mtp_keeps_greedy_tokens(checkpoints, family, method):
    """Chunked prefills (16-token budget) and decodes share steps; k = 3 reuses the one MTP
    module for the later drafts."""
    path = checkpoints[family]
    with LLM(path, **ENGINE) as llm:
        plain = _greedy(llm)
    with LLM(path, speculative_config={**MTP, "method": method}, **ENGINE) as llm:
        assert _greedy(llm) == plain
        stats = llm.engine.core.scheduler.spec_stats
        assert stats.num_drafts > 0 and stats.num_draft_tokens > stats.num_drafts


def test_mtp_kernels_get_the_engine_limits(checkpoints):
    """The MTP layer's attention kernels see the engine's limits in their ``AttentionSpec``
    (as the target's, a draft model's and an EAGLE head's do): ``max_model_len`` plus the k
    draft positions, ``max_num_seqs`` (backends/spec.py; the cuda kernel sizes its decode
    workspace from them)."""
    with LLM(checkpoints["glm4.5"], speculative_config=MTP, max_model_len=64, max_num_seqs=3,
             **ENGINE) as llm:
        kernel = llm.engine.core.runner.spec.proposer.kernel
        for k in getattr(kernel, "kernels", [kernel]):
            assert (k.spec.max_model_len, k.spec.max_num_seqs) == (64 + 3, 3)


def test_mtp_that_predicts_the_target_is_always_accepted(tmp_path):
    """Greedy: every draft accepted, the tokens unchanged. Seeded sampling through the
    rejection sampler: the tokens of the run without speculation, drafts accepted. The
    Prometheus counters export the scheduler's totals."""
    from prometheus_client import CollectorRegistry, generate_latest

    from tessellm.metrics.prometheus import EngineMetrics
    from tessellm.metrics.stats import EngineStats

    path = save_with_mtp(CONFIGS["deepseek-v3"](), str(tmp_path / "ds"), predictable=True)
    with LLM(path, **ENGINE) as llm:
        plain, plain_sampled = _greedy(llm), _seeded(llm)
    with LLM(path, speculative_config=MTP, **ENGINE) as llm:
        assert _greedy(llm) == plain
        core = llm.engine.core
        stats = core.scheduler.spec_stats.copy()
        assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
        assert _seeded(llm) == plain_sampled
        after = core.scheduler.stats().spec_decode
        assert after.num_accepted_tokens > stats.num_accepted_tokens
    metrics = EngineMetrics("m", CollectorRegistry())
    metrics.observe_stats(EngineStats.from_dict({"spec_decode": after.as_dict()}))
    text = generate_latest(metrics.registry).decode()
    assert f'tessellm:spec_decode_num_drafts_total{{model_name="m"}} {float(after.num_drafts)}' in text
    assert (f'tessellm:spec_decode_num_accepted_tokens_total{{model_name="m"}} '
            f'{float(after.num_accepted_tokens)}') in text


@pytest.mark.slow  # ~11 s; MTP rides on the EAGLE proposer, whose async path the default lane tests
def test_async_scheduling_with_reserved_drafts(tmp_path):
    """Async scheduling (steps scheduled ahead verify reserved drafts, core/spec_ahead.py) with
    the always-agreeing MTP module: the tokens without speculation, every draft accepted,
    steps ahead really scheduled, every KV block back."""
    path = save_with_mtp(CONFIGS["glm4.5"](), str(tmp_path / "glm"), predictable=True)
    with LLM(path, **ENGINE) as llm:
        plain = _greedy(llm)
    with LLM(path, speculative_config=MTP, async_scheduling=True, **ENGINE) as llm:
        core = llm.engine.core
        assert core.async_scheduling and core.scheduler.ahead is not None
        sched, ahead = core.scheduler, []
        schedule = sched.schedule

        def counting():
            out = schedule()
            ahead.append(sum(out.spec_ahead.values()) if out.spec_ahead else 0)
            return out

        sched.schedule = counting
        assert _greedy(llm) == plain
        stats = sched.spec_stats
        assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
        assert sum(ahead) > 0
        assert core.kv.num_free_blocks == core.kv.num_blocks


def test_own_lm_head_copy_that_differs_is_kept(tmp_path):
    """A ``shared_head.head`` unlike the target's LM head drafts with its own weights (and the
    tokens stay the target's)."""
    from safetensors.torch import load_file, save_file

    config = CONFIGS["deepseek-v3"]()
    path = save_with_mtp(config, str(tmp_path / "ds"), seed=3)
    file = f"{path}/model.safetensors"
    t = load_file(file)
    name = f"model.layers.{config.num_hidden_layers}.shared_head.head.weight"
    t[name] = torch.randn_like(t[name])
    save_file(t, file, metadata={"format": "pt"})
    with LLM(path, **ENGINE) as llm:
        plain = _greedy(llm, 6)
    with LLM(path, speculative_config=MTP, **ENGINE) as llm:
        head = llm.engine.core.executor.worker.runner.spec.proposer.model
        assert head.own_head is not None and head.own_embed is None
        assert _greedy(llm, 6) == plain


def test_tp2_drafts_as_one_process(tmp_path):
    """Tensor parallelism (2 ranks, gloo): MLA heads and MoE experts split, the MTP layer's
    input norm not summed (its input is whole), its output summed by the shared head's norm.
    An MTP layer that half agrees with its target (noise in its shared experts): the same drafts,
    accepted and rejected alike, as one process, and the target's tokens."""
    path = save_with_mtp(CONFIGS["deepseek-v3"](), str(tmp_path / "ds"), predictable=True,
                         noise=0.05)
    with LLM(path, **ENGINE) as llm:
        plain = _greedy(llm)
    counts = []
    for tp in (1, 2):
        with LLM(path, speculative_config=MTP, tensor_parallel_size=tp, **ENGINE) as llm:
            assert _greedy(llm) == plain
            s = llm.engine.core.scheduler.spec_stats
            counts.append((s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens,
                           list(s.accepted_per_pos)))
    assert 0 < counts[0][2] < counts[0][1]  # some drafts accepted, some rejected
    assert counts[1] == counts[0]


@pytest.mark.parametrize("family", [pytest.param("deepseek-v3", marks=pytest.mark.slow), "glm4.5"])
def test_block_fp8_checkpoint(family, tmp_path):
    """DeepSeek-V3 / GLM-4.5-FP8-style checkpoints (block-wise fp8, 128x128, every linear of the
    MTP layer too, its eh_proj and head copy included): the MTP layer's experts keep fp8 codes
    (the target's quant method; DeepSeek's MLA projections dequantized as the target's are), its
    own parts load dequantized; greedy tokens equal the fp8 target's alone."""
    from tests.quantization.block_fp8_checkpoint import write_block_fp8

    if family == "glm4.5":
        config = glm4_moe_config(hidden_size=128, head_dim=32, intermediate_size=192,
                                 moe_intermediate_size=128, use_qk_norm=True, n_group=4,
                                 topk_group=2, routed_scaling_factor=2.5, initializer_range=0.1,
                                 num_hidden_layers=2)
    else:
        config = deepseek_config(True, hidden_size=128, intermediate_size=192,
                                 moe_intermediate_size=128, q_lora_rank=48, n_group=4,
                                 topk_group=2, routed_scaling_factor=2.5, initializer_range=0.1)
    dense = save_with_mtp(config, str(tmp_path / "dense"), seed=11)
    fp8, _ = write_block_fp8(dense, str(tmp_path / "fp8"), str(tmp_path / "deq"))
    with LLM(fp8, **ENGINE) as llm:
        plain = _greedy(llm, 8)
    with LLM(fp8, speculative_config=MTP, **ENGINE) as llm:
        head = llm.engine.core.executor.worker.runner.spec.proposer.model
        assert head.layer.mlp.experts.w13.dtype == torch.float8_e4m3fn
        assert head.eh_proj.weight.dtype == torch.float32
        assert _greedy(llm, 8) == plain
        assert llm.engine.core.scheduler.spec_stats.num_drafts > 0


# -- refusals ---------------------------------------------------------------------------------

def test_aliases_are_the_mtp_method():
    from tessellm.spec_decode.config import parse_speculative_config

    for alias in ("deepseek_mtp", "glm4_moe_mtp", "qwen3_next_mtp", "ernie_mtp", "mtp"):
        config = parse_speculative_config({"method": alias, "num_speculative_tokens": 2})
        assert config.method == "mtp" and config.num_lookahead_tokens == 2


def test_checkpoint_without_mtp_layers_is_refused(tmp_path):
    path = save_deepseek(CONFIGS["deepseek-v3"](), str(tmp_path / "plain"))
    with pytest.raises(ValueError, match=r"has no multi-token-prediction layer \(no "
                                         r"model\.layers\.2\.\* tensors.*use method ngram"):
        LLM(path, speculative_config=MTP, **ENGINE)


def test_family_without_mtp_layers_is_refused(tmp_path):
    from tests.spec_decode.test_draft_proposers import TARGET, _save_llama

    path = _save_llama(str(tmp_path / "llama"), dict(TARGET, num_hidden_layers=1), 1)
    with pytest.raises(ValueError, match="LlamaForCausalLM has none: use method ngram"):
        LLM(path, speculative_config=MTP, **ENGINE)


def test_other_model_directory_and_pipeline_parallel_are_refused(checkpoints, tmp_path):
    path = checkpoints["deepseek-v3"]
    with pytest.raises(ValueError, match="drop \"model\""):
        LLM(path, speculative_config={**MTP, "model": str(tmp_path)}, **ENGINE)
    with pytest.raises(ValueError, match="does not combine with pipeline_parallel_size"):
        LLM(path, speculative_config=MTP, pipeline_parallel_size=2, **ENGINE)


# -- other backends ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.interpreted
def test_mtp_on_mla_target_emulated_cuda(checkpoints):
    """The cuda backend in emulation: target and MTP layer on the Triton MLA kernel (each with
    its own kernel and metadata), Triton in the interpreter on host tensors."""
    emulated = dict(ENGINE, device="cuda", emulate=True)
    path = checkpoints["deepseek-v3"]
    with LLM(path, **emulated) as llm:
        want = _greedy(llm, 6)
    with LLM(path, speculative_config=MTP, **emulated) as llm:
        assert _greedy(llm, 6) == want
        assert llm.engine.core.scheduler.spec_stats.num_drafts > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", [*CONFIGS, "predictable"])
def test_mtp_greedy_equals_plain_on_cuda(checkpoints, family, tmp_path):
    """A CUDA GPU, float32: Triton MLA / paged attention, fused experts, the verify and the MTP
    draft steps replayed from CUDA graphs (capture sizes up to 8 sequences); the tokens of the
    run without speculation, every KV block back, and every draft of the predictable MTP
    module accepted."""
    if family == "predictable":
        path = save_with_mtp(CONFIGS["deepseek-v3"](), str(tmp_path / "p"), predictable=True)
    else:
        path = checkpoints[family]
    cuda = dict(device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=32,
                max_num_seqs=8)
    with LLM(path, **cuda) as llm:
        plain = _greedy(llm, 14)
    with LLM(path, speculative_config=MTP, **cuda) as llm:
        assert _greedy(llm, 14) == plain
        core = llm.engine.core
        stats = core.scheduler.spec_stats
        assert stats.num_drafts > 0
        assert core.kv.num_free_blocks == core.kv.num_blocks
        if family == "predictable":
            assert stats.num_accepted_tokens == stats.num_draft_tokens
