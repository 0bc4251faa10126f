"""EAGLE over a Granite target, whose token embeddings are scaled by ``embedding_multiplier``
before its first layer. The head reads the raw embedding table (``embed_tokens(ids)``, not
scaled), as EAGLE heads are trained: vLLM's speculators and the EAGLE reference code look the
next token up in the verifier's embedding weights, and vLLM and SGLang draft the same way for
Granite. Greedy tokens equal the target's alone; drafts are proposed and verified."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM
from tests.spec_decode.test_draft_proposers import ENGINE, TARGET, _greedy, _save_head, _spec

SCALARS = dict(embedding_multiplier=12.0, attention_multiplier=0.25, residual_multiplier=0.5,
               logits_scaling=1.5)


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    from transformers import AutoModelForCausalLM, GraniteConfig

    root = tmp_path_factory.mktemp("eagle-granite")
    torch.manual_seed(8)
    target = str(root / "granite")
    AutoModelForCausalLM.from_config(GraniteConfig(**TARGET, **SCALARS),
                                     dtype=torch.float32).save_pretrained(target)
    return target, _save_head(str(root / "eagle"), "eagle", TARGET, 3)


def test_eagle_on_granite_reads_the_raw_embedding(granite):
    target, head = granite
    with LLM(target, **ENGINE) as llm:
        plain = _greedy(llm)
    with LLM(target, speculative_config=_spec("eagle", head, 3), **ENGINE) as llm:
        core = llm.engine.core
        model = core.runner.spec.proposer.model
        table = core.runner.model.embed_tokens.weight
        seen = []
        hook = model.fc.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
        got = _greedy(llm)
        hook.remove()
        assert got == plain
        assert core.scheduler.spec_stats.num_drafts > 0
        assert core.runner.model.embedding_multiplier == 12.0
    # every fc input's first half is a row of the raw table (the target's layer 0 sees it x12)
    h = TARGET["hidden_size"]
    rows = torch.cat([x[:, :h] for x in seen])
    nearest = torch.cdist(rows, table, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert len(rows) > 0 and nearest.values.max().item() < 1e-5
