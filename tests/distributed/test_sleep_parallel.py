"""Sleep mode under tensor parallelism on the CPU (two gloo ranks in worker processes): every
rank frees and restores its shard; new weights pushed as tensors reach both ranks (through a
safetensors file in shared memory) and give HF's tokens on them; a bad tensor is refused on the
ranks without killing them."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from tessellm import LLM, SamplingParams
from tests.conftest import hf_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 17, 42, 99, 3, 250], list(range(40, 80))]


def _tokens(llm) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_tp2_sleep_wake_and_new_weights(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama-sharp")
    original = load_file(os.path.join(path, "model.safetensors"))
    torch.manual_seed(3)
    updated = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    updated_dir = tmp_path / "updated"
    updated_dir.mkdir()
    from safetensors.torch import save_file

    save_file(updated, str(updated_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(path):
        if name.endswith(".json"):
            (updated_dir / name).write_bytes(open(os.path.join(path, name), "rb").read())
    with LLM(path, device="cpu", num_kv_blocks=64, seed=0, tensor_parallel_size=2,
             enable_sleep_mode=True) as llm:
        expected = _tokens(llm)
        assert expected == hf_greedy(path, PROMPTS, GREEDY.max_tokens)
        report = llm.engine.core.sleep(1)  # summed over both ranks
        assert report["offloaded_bytes"] > 0 and report["kv_cache_bytes"] > 0 and report["kept_bytes"] == 0
        llm.wake_up()
        assert _tokens(llm) == expected
        llm.sleep(level=2)
        llm.wake_up(tags=["weights"])
        tied = {**updated, "extra.alias": updated["model.norm.weight"]}  # shared storage: cloned
        with pytest.raises(ValueError, match="no place"):
            llm.load_weights(tied)
        assert llm.load_weights(updated.items()) > 0
        llm.wake_up(tags=["kv_cache"])
        assert _tokens(llm) == hf_greedy(str(updated_dir), PROMPTS, GREEDY.max_tokens)
        with pytest.raises(ValueError, match="rank 0.*shape"):
            llm.load_weights([("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3))])
        llm.load_weights(path=path)  # the ranks serve on
        with pytest.raises(ValueError, match="not a method of the workers"):  # no rank dies of it
            llm.collective_rpc("no_such_method")
        per_rank = llm.collective_rpc("kv_block_bytes")
        assert per_rank[0] > 0
        # vLLM's timeout: no rank can answer in 0 s; the late answers arrive while the next
        # step is collected, and are dropped (the step's tokens and the next call's answers
        # are still right)
        with pytest.raises(TimeoutError, match="'kv_block_bytes' timed out: ranks 0, 1 did not answer"):
            llm.collective_rpc("kv_block_bytes", timeout=0)
        assert _tokens(llm) == expected
        with pytest.raises(TimeoutError):
            llm.collective_rpc("kv_block_bytes", timeout=0)
        assert llm.collective_rpc("kv_block_bytes", timeout=60) == per_rank
