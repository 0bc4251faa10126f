"""Captured decode steps cover LoRA batches when the backend's ops are capturable: the slots
travel as a static graph input (here the cpu backend's torch.compile runner stands in for
CUDA graphs) and the tokens still equal HF + peft."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest
from tests.lora.adapters import peft_greedy


class GatherLoRAOps:
    """Batched LoRA with no host read (a gather of each row's slot): capturable."""

    supports_graph_capture = True

    def prepare(self, token_slots, num_slots):
        return token_slots.long()

    def shrink(self, x, lora_a, meta, out):
        y = torch.bmm(lora_a[meta.clamp(min=0)].float(), x.float().unsqueeze(-1)).squeeze(-1)
        out.copy_(y * (meta >= 0).unsqueeze(-1))

    def expand(self, buf, lora_b, meta, scaling, out, out_offset):
        s = meta.clamp(min=0)
        y = torch.bmm(lora_b[s].float(), buf.float().unsqueeze(-1)).squeeze(-1)
        y = y * (scaling[s] * (meta >= 0)).unsqueeze(-1)
        n = lora_b.shape[1]
        out[:, out_offset:out_offset + n] += y.to(out.dtype)


@pytest.mark.slow
def test_decode_graphs_cover_lora(lora_setup, monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    model, paths = lora_setup
    prompts = [[5, 17, 200, 33], [8, 91, 4, 100, 7, 3]]
    llm = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32, max_num_seqs=4)
    runner = llm.engine.core.runner
    assert runner.graph_runner is not None, "the cpu backend compiles its decode step"
    runner.lora.batch.ops = GatherLoRAOps()
    runner.capture_graphs()  # again, now with the slots as an input
    assert runner._lora_graphs
    replays = []
    run = runner.graph_runner.run
    runner.graph_runner.run = lambda inputs: replays.append(len(inputs)) or run(inputs)
    loras = [LoRARequest("qv8", 1, paths["qv8"]), LoRARequest("all32", 2, paths["all32"])]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=loras)
    assert replays and all(n == 6 for n in replays)  # decode steps replayed, slots included
    for out, prompt, lora in zip(outs, prompts, ("qv8", "all32")):
        assert out.outputs[0].token_ids == peft_greedy(model, paths[lora], [prompt], 6)[0]


@pytest.mark.slow
def test_verify_graphs_cover_lora(lora_setup):
    """Speculative verify steps with adapters replay the verify graphs (the slots of every
    token row are one more static input) and keep HF + peft's tokens (drafts replayed from
    them, so every draft is accepted and every step verifies)."""
    from tests.spec_decode.test_verify_graphs import StandInGraphRunner

    model, paths = lora_setup
    prompts = [[5, 17, 200, 33], [8, 91, 4, 100, 7, 3]]
    llm = LLM(model, dtype="float32", enable_lora=True, max_lora_rank=32, max_num_seqs=4,
              speculative_config={"method": "replay", "num_speculative_tokens": 3,
                                  "replay_records": []})
    runner = llm.engine.core.runner
    runner.lora.batch.ops = GatherLoRAOps()
    runner.graph_runner = StandInGraphRunner((1, 2, 4))
    runner.kernel.supports_graph_capture = True
    runner.verify_graph_factory = StandInGraphRunner
    runner.capture_graphs()
    assert runner.verify_graphs.lora is runner.lora.batch
    names = ("qv8", "all32")
    want = [peft_greedy(model, paths[n], [p], 9)[0] for p, n in zip(prompts, names)]
    for p, w in zip(prompts, want):
        runner.spec.proposer.records[tuple(p)] = list(w)
    loras = [LoRARequest(n, i + 1, paths[n]) for i, n in enumerate(names)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=9, temperature=0, ignore_eos=True),
                        use_tqdm=False, lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert sum(r.replays for r in runner.verify_graphs.runners.values()) >= 2
    llm.shutdown()
