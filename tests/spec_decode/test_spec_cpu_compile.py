"""Speculation with the cpu backend's compiled graphs (TESSELLM_CPU_COMPILE=1): n-gram, replay
and draft-model engines start (verify graphs captured for q = 2..k+1; a captured verify step has
no host lists), replay captured verify steps, and give the greedy tokens of the plain eager
engine. Minutes of inductor on two cores: ``slow``."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 7, 7, 12, 30], [1, 2, 3, 1, 2, 3, 1, 2], [300, 301, 302, 303, 300]]
ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=128, max_model_len=96,
              max_num_seqs=4, seed=0)
PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _generate(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.slow
def test_compiled_verify_graphs_give_plain_tokens(tiny_model_dir, monkeypatch):
    model = tiny_model_dir("llama")
    with LLM(model, enforce_eager=True, **ENGINE) as llm:
        want = _generate(llm)
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    records = [{"prompt_token_ids": p, "output_token_ids": w} for p, w in zip(PROMPTS, want)]
    configs = [{"method": "replay", "num_speculative_tokens": 2, "replay_records": records},
               {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1},
               {"method": "draft_model", "model": model, "num_speculative_tokens": 2}]
    for config in configs:
        with LLM(model, speculative_config=config, **ENGINE) as llm:
            runner = llm.engine.core.runner
            assert runner.verify_graphs is not None and set(runner.verify_graphs.runners) == {2, 3}
            replays = []
            for q, graph in runner.verify_graphs.runners.items():
                run = graph.run
                graph.run = lambda x, run=run: replays.append(len(x[0])) or run(x)
            assert _generate(llm) == want, config["method"]
            stats = llm.engine.core.scheduler.spec_stats
            assert stats.num_accepted_tokens > 0, config["method"]
            if config["method"] != "ngram":  # every draft accepted: verify steps are uniform
                assert replays, config["method"]
            assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks
