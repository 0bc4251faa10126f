"""Draft-model and EAGLE / EAGLE-3 proposers on the cpu backend, with tiny random models built
here: greedy tokens with speculation equal those without (for any draft: the verification
keeps the target's argmax), loading errors are one clear sentence, and the block manager gets
every block back after preemption and an abort mid-speculation."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tessellm import LLM
from tessellm.core.sampling_params import SamplingParams

TARGET = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, initializer_range=0.25)  # sharp logits: no greedy ties
DRAFT = dict(TARGET, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1)
# Small KV cache and token budget: prompts are chunked, decodes and prefills share steps, and
# the 4 requests do not fit at once (preemption).
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=28, max_model_len=128,
              max_num_seqs=4, max_num_batched_tokens=24)
PROMPTS = [[(7 * i + 3 * j) % 383 + 1 for j in range(n)] for i, n in enumerate((5, 23, 41, 12))]
MAX_TOKENS = 14


def _save_llama(path: str, cfg: dict, seed: int) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=torch.float32).save_pretrained(path)
    return path


def _rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def _save_head(path: str, method: str, cfg: dict, seed: int, draft_vocab: int = 96,
               bin_file: bool = False) -> str:
    """A random EAGLE (``eagle``) or EAGLE-3 (``eagle3``) head in the public checkpoint layout
    (``bin_file``: as ``pytorch_model.bin``, the format the published heads use)."""
    torch.manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    pre = "layers.0." if method == "eagle" else "midlayer."
    width = h if method == "eagle" else 2 * h  # EAGLE-3 q/k/v read [embeds, hidden]
    t = {f"{pre}self_attn.q_proj.weight": _rand(q, width), f"{pre}self_attn.k_proj.weight": _rand(kv, width),
         f"{pre}self_attn.v_proj.weight": _rand(kv, width), f"{pre}self_attn.o_proj.weight": _rand(h, q),
         f"{pre}mlp.gate_proj.weight": _rand(inter, h), f"{pre}mlp.up_proj.weight": _rand(inter, h),
         f"{pre}mlp.down_proj.weight": _rand(h, inter),
         f"{pre}post_attention_layernorm.weight": 1 + _rand(h, scale=0.05)}
    config = dict(cfg, architectures=["LlamaForCausalLM"], num_hidden_layers=1, model_type="llama")
    if method == "eagle":
        t.update({"fc.weight": _rand(h, 2 * h), "fc.bias": _rand(h)})
    else:
        ids = torch.randperm(v)[:draft_vocab].sort().values
        t.update({"fc.weight": _rand(h, 3 * h), "norm.weight": 1 + _rand(h, scale=0.05),
                  f"{pre}input_layernorm.weight": 1 + _rand(h, scale=0.05),
                  f"{pre}hidden_norm.weight": 1 + _rand(h, scale=0.05),
                  "lm_head.weight": _rand(draft_vocab, h, scale=1.0),
                  "d2t": ids - torch.arange(draft_vocab), "t2d": torch.zeros(v, dtype=torch.bool)})
        config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab,
                      eagle_aux_hidden_state_layer_ids=[0, 2, 3])
    os.makedirs(path, exist_ok=True)
    if bin_file:
        torch.save(t, os.path.join(path, "pytorch_model.bin"))
    else:
        save_file(t, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def _save_bigram_pair(root: str) -> tuple[str, str]:
    """A target whose next token depends on the current token only (every attention and MLP
    output projection zero: its residual stream is the embedding), and an EAGLE-1 head that
    predicts it exactly (``fc = [I | 0]``, its layer's outputs zero: it returns the next
    token's embedding, which the target's LM head scores as the target does, up to the final
    norm's positive scale). Every draft is accepted: the acceptance paths run."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(6)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TARGET), dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    target = os.path.join(root, "bigram")
    model.save_pretrained(target)
    head = _save_head(os.path.join(root, "bigram-eagle"), "eagle", TARGET, 7)
    path = os.path.join(head, "model.safetensors")
    from safetensors.torch import load_file

    t = load_file(path)
    h = TARGET["hidden_size"]
    t["fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    t["fc.bias"] = torch.zeros(h)
    t["layers.0.self_attn.o_proj.weight"].zero_()
    t["layers.0.mlp.down_proj.weight"].zero_()
    save_file(t, path)
    return target, head


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-draft")
    target = _save_llama(str(root / "target"), TARGET, 1)
    same = str(root / "same")
    shutil.copytree(target, same)  # a "perfect" draft: every draft accepted
    return {"target": target, "same": same,
            "draft": _save_llama(str(root / "draft"), DRAFT, 2),
            "eagle": _save_head(str(root / "eagle"), "eagle", TARGET, 3),
            "eagle3": _save_head(str(root / "eagle3"), "eagle3", TARGET, 4, bin_file=True)}


@pytest.fixture(scope="module")
def plain(models):
    with LLM(models["target"], **ENGINE) as llm:
        return _greedy(llm)


def _greedy(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _spec(method: str, model: str, k: int = 3) -> dict:
    return {"method": method, "model": model, "num_speculative_tokens": k, "disable_by_batch_size": 0}


@pytest.mark.parametrize("method,draft", [("draft_model", "draft"), ("draft_model", "same"),
                                          ("eagle", "eagle"), ("eagle3", "eagle3")])
def test_greedy_tokens_equal_without_speculation(models, plain, method, draft):
    with LLM(models["target"], speculative_config=_spec(method, models[draft]), **ENGINE) as llm:
        assert _greedy(llm) == plain
        core = llm.engine.core
        stats = core.scheduler.spec_stats
        assert stats.num_drafts > 0  # drafts were proposed and verified, not skipped
        assert core.scheduler.num_preemptions_total > 0
        assert core.kv.num_free_blocks == core.kv.num_blocks
        if draft == "same":  # the target drafting for itself: every draft is accepted
            assert stats.num_accepted_tokens == stats.num_draft_tokens


def test_abort_mid_speculation_returns_every_block(models):
    with LLM(models["target"], speculative_config=_spec("eagle3", models["eagle3"], 4),
             **ENGINE) as llm:
        core = llm.engine.core
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        from tessellm.core.engine_core import EngineCoreRequest

        for i, p in enumerate(PROMPTS[:3]):
            core.add_request(EngineCoreRequest(f"r{i}", p, params, 0.0))
        for _ in range(8):
            core.step()
        assert core.scheduler.spec_stats.num_drafts > 0
        core.abort_requests(["r1"])
        while core.has_unfinished_requests():
            core.step()
        assert core.kv.num_free_blocks == core.kv.num_blocks


def _seeded(llm) -> list[list[int]]:
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=MAX_TOKENS,
                             ignore_eos=True) for i in range(len(PROMPTS))]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_eagle_head_that_always_agrees(models, tmp_path):
    """Greedy: every draft accepted. Seeded sampling: the same tokens as without speculation
    (each row's randomness is its seed's and position's), some drafts accepted."""
    target, head = _save_bigram_pair(str(tmp_path))
    with LLM(target, **ENGINE) as llm:
        plain, plain_sampled = _greedy(llm), _seeded(llm)
    with LLM(target, speculative_config=_spec("eagle", head, 4), **ENGINE) as llm:
        assert _greedy(llm) == plain
        stats = llm.engine.core.scheduler.spec_stats.copy()
        assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
        assert _seeded(llm) == plain_sampled
        after = llm.engine.core.scheduler.spec_stats
        assert after.num_draft_tokens > stats.num_draft_tokens
        assert after.num_accepted_tokens > stats.num_accepted_tokens


@pytest.mark.parametrize("method,breakage,message", [
    ("draft_model", "missing", "cannot be loaded as a draft model: .* is neither a local directory"),
    ("draft_model", "vocab", "vocab_size 500 but the target has 384"),
    ("eagle", "missing", "no config.json"),
    ("eagle", "no_weights", "holds no weights"),
    ("eagle", "shape", r"fc.weight of shape \(64, 192\), expected \(64, 128\) \(an EAGLE-3 head\?"),
    ("eagle3", "hidden", "reads target hidden states of width 48"),
    ("eagle3", "vocab", "vocab_size 500 but the target model has 384"),
])
def test_loading_errors_are_one_sentence(models, tmp_path, method, breakage, message):
    path = str(tmp_path / "broken")
    if breakage == "missing":
        path = str(tmp_path / "nowhere")
    elif breakage == "vocab" and method == "draft_model":
        _save_llama(path, dict(DRAFT, vocab_size=500), 5)
    elif breakage == "no_weights":
        _save_head(path, "eagle", TARGET, 5)
        os.remove(os.path.join(path, "model.safetensors"))
    elif breakage == "shape":
        _save_head(path, "eagle3", TARGET, 5)  # an EAGLE-3 head given as method eagle
    elif breakage == "hidden":
        _save_head(path, "eagle3", dict(TARGET, hidden_size=48), 5)
    elif breakage == "vocab":
        _save_head(path, "eagle3", dict(TARGET, vocab_size=500), 5)
    with pytest.raises(ValueError, match=message):
        LLM(models["target"], speculative_config=_spec(method, path), **ENGINE)


def test_draft_model_drafts_past_max_position_embeddings_under_yarn(tmp_path):
    """A target and draft of max_position_embeddings 32 with yarn factor 4 serve 128 positions
    (``rope_max_positions``); the drafter capped its positions at 32, so a request past
    position 32 got no drafts at all. The target drafting for itself: every draft accepted,
    tokens equal to the run without speculation."""
    cfg = dict(TARGET, max_position_embeddings=32,
               rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    target = _save_llama(str(tmp_path / "target"), cfg, 5)
    same = str(tmp_path / "same")
    shutil.copytree(target, same)
    engine = dict(ENGINE, num_kv_blocks=64)
    prompt = [(5 * j) % 383 + 1 for j in range(40)]  # every position drafted is past 32
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    with LLM(target, **engine) as llm:
        want = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    with LLM(target, speculative_config=_spec("draft_model", same), **engine) as llm:
        got = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
        stats = llm.engine.core.scheduler.spec_stats
    assert got == want
    assert stats.num_draft_tokens >= 8 and stats.num_accepted_tokens == stats.num_draft_tokens
