"""EAGLE and EAGLE-3 heads under tensor parallelism on the CPU (``mp`` executor, 2 ranks, gloo):
each rank loads its shard of the head (q/k/v and gate/up by rows, o/down by columns, EAGLE-3's
LM head by vocabulary rows) and drafts from the hidden states it holds whole; the greedy tokens
equal the target's alone, and every draft the two ranks propose is the one a single process
proposes (the spec counters, per position, equal TP=1's with the same head).

The heads here half agree with their target, so some drafts are accepted and some rejected,
and the counters see a wrong shard or a missing sum: the target's greedy next token is a
function ``f`` of the current token (attention outputs zero, one MLP, in layer 2, whose output
is a partial sum on each rank until the next norm), and each head predicts it from the right
input (EAGLE-1: the next token through the target's MLP; EAGLE-3: ``f(f(t))`` from the stream
entering the last layer) with random layers (``NOISE``) that perturb it. The target alone at
TP=2 equals TP=1 (tests/distributed/test_parallel_parity.py)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessellm import LLM
from tests.spec_decode.test_draft_proposers import (ENGINE, TARGET, _greedy, _save_bigram_pair,
                                                    _save_head, _spec)

NOISE = 0.5  # scale of the heads' o_proj (and EAGLE-3's down_proj)


def _per_token_target(root: str) -> str:
    """A target whose greedy next token is a function of the current token only: attention
    outputs zero, one MLP (layer 2; under tensor parallelism its output is a partial sum on
    each rank until the next norm)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(6)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TARGET), dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            if i != 2:
                layer.mlp.down_proj.weight.zero_()
    path = os.path.join(root, "per-token")
    model.save_pretrained(path)
    return path


def _per_token_map(target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``f``: the greedy next token after each token id, the residual stream entering the
    last layer for each token id), from HF transformers over one-token inputs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    ids = torch.arange(TARGET["vocab_size"]).unsqueeze(1)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits[:, -1].argmax(dim=-1), out.hidden_states[3][:, -1]


def _draft_vocab(f: torch.Tensor) -> torch.Tensor:
    """EAGLE-3's reduced vocabulary (target ids, sorted): every token after next, padded to an
    odd size (the LM head's rows then split unevenly over 2 ranks: the last one pads)."""
    ids = torch.unique(f[f])
    if len(ids) % 2 == 0:
        ids = torch.unique(torch.cat([ids, torch.tensor([int(ids.max()) + 1 if ids.max() < len(f) - 1
                                                        else int(ids.min()) - 1])]))
    return ids


def _half_agreeing_head(root: str, method: str, target: str, own: bool = False) -> str:
    """EAGLE-1: ``fc = [I | 0]`` reads the next token's embedding, the layer's MLP is the
    target's, the target's LM head scores its output. EAGLE-3 reads the residual stream of the
    current token ``t`` entering the target's last layer (``fc = [0 | 0 | I]``); its LM head
    scores ``f(f(t))``, the token after next, which is right for a first draft after a target
    token. Both: a noisy o_proj (and EAGLE-3 a noisy MLP) that makes some drafts wrong."""
    f, stream = _per_token_map(target)
    h, v = TARGET["hidden_size"], TARGET["vocab_size"]
    vocab = _draft_vocab(f) if own else torch.arange(v)
    path = _save_head(os.path.join(root, f"{method}-half{'-own' if own else ''}"), method, TARGET,
                      11, draft_vocab=len(vocab))
    file = os.path.join(path, "model.safetensors")
    t = load_file(file)
    pre = "layers.0." if method == "eagle" else "midlayer."
    gen = torch.Generator().manual_seed(12)
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        t[pre + name] = torch.randn(t[pre + name].shape, generator=gen) * NOISE / t[pre + name].shape[1] ** 0.5
    if method == "eagle":
        w = load_file(os.path.join(target, "model.safetensors"))
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "post_attention_layernorm.weight"):
            t[pre + name] = w["model.layers.2." + name]
        t["fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
        t["fc.bias"] = torch.zeros(h)
    else:
        t["fc.weight"] = torch.cat([torch.zeros(h, 2 * h), torch.eye(h)], dim=1)
        t["norm.weight"] = torch.ones(h)
        unit = stream / stream.norm(dim=-1, keepdim=True)
        # row j: the sum of the tokens whose token after next is j (scaled: sharp logits)
        t["lm_head.weight"] = (torch.zeros(v, h).index_add_(0, f[f], unit) * 4.0)[vocab]
        t["d2t"] = vocab - torch.arange(len(vocab))
        if own:  # its own embedding table (vocab-parallel under TP): the target's values
            t["embed_tokens.weight"] = load_file(os.path.join(target, "model.safetensors"))[
                "model.embed_tokens.weight"]
    save_file(t, file)
    return path


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("eagle-tp"))
    target, exact = _save_bigram_pair(root)
    per_token = _per_token_target(root)
    with LLM(target, **ENGINE) as llm:
        plain = _greedy(llm)
    with LLM(per_token, **ENGINE) as llm:
        per_token_plain = _greedy(llm)
    return {"root": root, "target": target, "exact": exact, "plain": plain,
            "per_token": per_token, "per_token_plain": per_token_plain}


def _run(target: str, head: str, method: str, tp: int, device: str = "cpu",
         async_scheduling: bool = False):
    with LLM(target, speculative_config=_spec(method, head, 3), tensor_parallel_size=tp,
             async_scheduling=async_scheduling, **dict(ENGINE, device=device)) as llm:
        core = llm.engine.core
        tokens = _greedy(llm)
        if tp > 1:
            assert len(core.executor.worker_info) == tp  # real worker processes
        assert core.kv.num_free_blocks == core.kv.num_blocks
        return tokens, core.scheduler.spec_stats.copy()


def _counts(stats) -> tuple:
    return (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
            list(stats.accepted_per_pos))


@pytest.mark.parametrize("method,own,async_scheduling", [
    ("eagle", False, False), ("eagle3", False, False), ("eagle3", True, False),
    ("eagle3", False, True)])
def test_tp2_head_drafts_as_one_process(targets, method, own, async_scheduling):
    """``own``: EAGLE-3 with its own embedding and a reduced draft vocabulary of odd size.
    ``async_scheduling``: steps scheduled ahead with reserved drafts."""
    head = _half_agreeing_head(targets["root"], method, targets["per_token"], own)
    one_tokens, one = _run(targets["per_token"], head, method, 1, async_scheduling=async_scheduling)
    two_tokens, two = _run(targets["per_token"], head, method, 2, async_scheduling=async_scheduling)
    assert one_tokens == targets["per_token_plain"] and two_tokens == targets["per_token_plain"]
    assert 0 < one.num_accepted_tokens < one.num_draft_tokens  # the head half agrees
    # The same drafts: without the target's aux states summed over the ranks (EAGLE-3) or the
    # head's last down_proj summed (EAGLE-1) these counts differ.
    assert _counts(two) == _counts(one)


def test_tp2_exact_eagle_head_accepts_every_draft(targets):
    tokens, stats = _run(targets["target"], targets["exact"], "eagle", 2)
    assert tokens == targets["plain"]
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens


def test_tp2_head_whose_heads_do_not_split_is_refused(targets):
    path = _save_head(os.path.join(targets["root"], "one-head"), "eagle",
                      dict(TARGET, num_attention_heads=1, num_key_value_heads=1), 5)
    from tessellm.distributed.executor import WorkerDiedError

    # raised in the workers (where the head is built), passed on with the rank that failed
    with pytest.raises(WorkerDiedError, match=r"The eagle head at .*one-head cannot run with this "
                                         r"tensor_parallel_size: .*1 attention heads do not split"):
        LLM(targets["per_token"], speculative_config=_spec("eagle", path), tensor_parallel_size=2,
            **ENGINE)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_two_gpus_head_drafts_as_one_gpu(targets, method):
    """NCCL, the fused all-reduce + norm, graph-captured draft steps: the same drafts on
    two GPUs as on one, the target's tokens (float32)."""
    head = _half_agreeing_head(targets["root"], method, targets["per_token"])
    one_tokens, one = _run(targets["per_token"], head, method, 1, "cuda")
    two_tokens, two = _run(targets["per_token"], head, method, 2, "cuda")
    assert one_tokens == targets["per_token_plain"] and two_tokens == targets["per_token_plain"]
    assert one.num_accepted_tokens > 0
    assert _counts(two) == _counts(one)
