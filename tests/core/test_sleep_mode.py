"""Sleep mode (core/runner_sleep.py, docs/sleep_mode.md) on the cpu backend, on a tiny Llama
against HF transformers: sleep(1) + wake_up gives the same greedy tokens, sleep(2) discards the
weights (all-zero model) until load_weights refills them, new weights give HF's tokens on those
weights, the memory really goes (storages of 0 bytes, a 0-block KV cache), the prefix cache is
empty after a sleep, requests and weight loads are refused while the parts they need sleep, and
bad calls raise one clear error without breaking the engine."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessellm import LLM, SamplingParams
from tessellm.core.runner_sleep import EngineAsleepError
from tests.conftest import hf_greedy

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[1, 5, 9, 22, 33, 44, 55, 66, 77, 88, 99, 100, 120, 130, 140, 150, 160, 170], [3, 4, 5, 6]]


def _tokens(llm) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def other_dir(model_dir, tmp_path_factory):
    """The same architecture with other weights (every tensor perturbed): an RL update."""
    out = tmp_path_factory.mktemp("updated")
    torch.manual_seed(7)
    weights = {k: v + 0.05 * torch.randn_like(v) for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(model_dir):
        if name.endswith(".json"):
            shutil.copy(os.path.join(model_dir, name), out)
    return str(out)


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, device="cpu", num_kv_blocks=64, enable_sleep_mode=True) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(model_dir):
    return hf_greedy(model_dir, PROMPTS, GREEDY.max_tokens)


def _model_bytes(llm) -> int:
    model = llm.engine.core.runner.model
    return sum(p.untyped_storage().nbytes() for p in model.parameters())


def test_level1_round_trip_frees_memory_and_keeps_outputs(llm, reference):
    assert _tokens(llm) == reference
    core = llm.engine.core
    assert core.kv.cached  # the prompts' full blocks are in the prefix cache
    resident = _model_bytes(llm)
    llm.sleep(level=1)
    assert llm.is_sleeping()
    assert _model_bytes(llm) == 0
    assert all(layer.k_cache.numel() == 0 for layer in core.runner.kv_layers())
    assert not core.kv.cached  # the KV contents are gone: so is the prefix cache
    with pytest.raises(EngineAsleepError, match="asleep"):
        llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)
    llm.wake_up()
    assert not llm.is_sleeping()
    assert _model_bytes(llm) == resident
    hits = core.kv.stats.hits
    assert _tokens(llm) == reference
    assert core.kv.stats.hits == hits  # nothing was served from a cache that no longer holds KV


def test_level2_discards_weights_until_loaded(llm, model_dir, reference):
    llm.sleep(level=2)
    llm.wake_up(tags=["weights"])
    assert llm.is_sleeping()  # the KV cache still sleeps: requests still refused
    with pytest.raises(EngineAsleepError, match="kv_cache"):
        llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)
    llm.wake_up(tags=["kv_cache"])
    assert _tokens(llm) == [[0] * GREEDY.max_tokens] * len(PROMPTS)  # zero weights: logits all 0
    llm.sleep(level=2)
    with pytest.raises(EngineAsleepError, match="wake_up"):  # nowhere to copy them yet
        llm.load_weights(path=model_dir)
    llm.wake_up(tags=["weights"])
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    assert llm.load_weights(weights.items()) > 0
    llm.wake_up(tags=["kv_cache"])
    assert _tokens(llm) == reference


def test_new_weights_give_hf_outputs_on_them(llm, model_dir, other_dir, reference):
    _tokens(llm)
    assert llm.engine.core.kv.cached
    llm.load_weights(path=other_dir)
    assert not llm.engine.core.kv.cached  # KV computed by the old weights is not reused
    assert _tokens(llm) == hf_greedy(other_dir, PROMPTS, GREEDY.max_tokens)
    llm.load_weights(path=model_dir)
    assert _tokens(llm) == reference


def test_bad_calls_are_refused_and_the_engine_serves_on(llm, reference, tmp_path):
    with pytest.raises(ValueError, match="level must be 1"):
        llm.sleep(level=3)
    with pytest.raises(ValueError, match="Unknown wake_up tag"):
        llm.wake_up(tags=["kv"])
    with pytest.raises(ValueError, match="no place"):
        llm.load_weights([("not.a.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="None of the given tensors"):
        llm.load_weights([])
    with pytest.raises(ValueError, match="shape"):
        llm.load_weights([("model.layers.0.mlp.down_proj.weight", torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="no safetensors checkpoint"):
        llm.load_weights(path="/nonexistent/checkpoint")
    with pytest.raises(ValueError, match="does not read as safetensors"):
        llm.load_weights(path=_corrupt_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="one of weights"):
        llm.load_weights()
    llm.wake_up()  # awake: a no-op
    assert not llm.is_sleeping()
    assert _tokens(llm) == reference


def _corrupt_checkpoint(root) -> str:
    """A directory whose model.safetensors is not safetensors (a truncated or wrong file)."""
    (root / "model.safetensors").write_bytes(b"\xff" * 64)
    return str(root)


def test_sleep_needs_sleep_mode(model_dir):
    with LLM(model_dir, device="cpu", num_kv_blocks=16) as plain:
        with pytest.raises(ValueError, match="enable_sleep_mode=True"):
            plain.sleep()
        assert not plain.is_sleeping()


@pytest.mark.slow
def test_compiled_decode_graphs_are_captured_again(model_dir, reference, monkeypatch):
    """The cpu backend's compiled decode step (its graphs): released at sleep, compiled again at
    wake over the new storages; the decode steps then replay it (~50 s on 2 cores)."""
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "1")
    with LLM(model_dir, device="cpu", num_kv_blocks=64, enable_sleep_mode=True, max_num_seqs=4) as llm:
        runner = llm.engine.core.runner
        assert runner._graphs_ready
        assert _tokens(llm) == reference
        llm.sleep(level=1)
        assert runner.graph_runner._compiled is None and not runner._graphs_ready
        llm.wake_up()
        assert runner._graphs_ready and runner.graph_runner._compiled is not None
        assert _tokens(llm) == reference


def test_reset_prefix_cache_waits_for_free_blocks():
    from tessellm.core.block_manager import BlockManager
    from tessellm.core.request import Request

    kv = BlockManager(num_blocks=8, block_size=4)
    r = Request("a", list(range(10)), SamplingParams())
    kv.allocate(r, 10)
    kv.publish_full_blocks(r, 10)
    assert len(kv.cached) == 2
    assert not kv.reset_prefix_cache() and len(kv.cached) == 2  # a request holds its blocks
    kv.free(r)
    assert kv.reset_prefix_cache()
    assert not kv.cached and all(b.block_hash is None for b in kv.blocks)
    assert kv.find_cached_prefix(Request("b", list(range(10)), SamplingParams())) == []


def test_new_weights_empty_the_host_kv_tier(model_dir, other_dir):
    """With a host tier behind the prefix cache (kv_offloading_size), blocks evicted there hold
    the old weights' KV too: load_weights empties it, and a prompt that was in it is computed
    again (HF's tokens on the new weights)."""
    prompts = [list(range(3, 43)), list(range(50, 90)), list(range(100, 140))]
    with LLM(model_dir, device="cpu", block_size=4, num_kv_blocks=16, max_model_len=128,
             kv_offloading_size=0.01, enable_sleep_mode=True) as llm:
        host = llm.engine.core.kv.host
        for p in prompts:  # each evicts the one before into the host tier
            llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False)
        assert host.num_used > 0
        llm.load_weights(path=other_dir)
        assert host.num_used == 0
        out = llm.generate({"prompt_token_ids": prompts[0]}, GREEDY, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
        assert [out.outputs[0].token_ids] == hf_greedy(other_dir, prompts[:1], GREEDY.max_tokens)
        llm.sleep(level=1)
        llm.wake_up()
        assert host.num_used == 0


def test_draft_model_sleeps_and_keeps_its_weights_at_level_2(model_dir, other_dir, reference):
    """Speculative decoding with a draft model: sleep frees its weights and KV cache too; at
    level 2 only the target's parameters are discarded (load_weights refills those), the
    draft's come back from the host, so drafts stay useful and greedy tokens stay HF's."""
    spec = {"method": "draft_model", "model": other_dir, "num_speculative_tokens": 2}
    with LLM(model_dir, device="cpu", num_kv_blocks=64, enable_sleep_mode=True,
             speculative_config=spec) as llm:
        assert _tokens(llm) == reference
        draft = llm.engine.core.runner.spec.proposer.model
        draft_bytes = sum(p.untyped_storage().nbytes() for p in draft.parameters())
        llm.sleep(level=2)
        assert sum(p.untyped_storage().nbytes() for p in draft.parameters()) == 0
        llm.wake_up(tags=["weights"])
        llm.load_weights(path=model_dir)
        llm.wake_up(tags=["kv_cache"])
        assert sum(p.untyped_storage().nbytes() for p in draft.parameters()) == draft_bytes
        assert _tokens(llm) == reference
        with torch.inference_mode():
            ref_draft = load_file(os.path.join(other_dir, "model.safetensors"))["model.embed_tokens.weight"]
        assert torch.equal(draft.embed_tokens.weight, ref_draft)  # the draft's own weights, not zeros


def test_load_weights_takes_a_dict_and_refuses_other_things(llm, model_dir, reference):
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    assert llm.load_weights(weights) > 0  # a state dict as it is
    with pytest.raises(ValueError, match="pairs"):
        llm.load_weights([("model.norm.weight", [1.0] * 64)])
    with pytest.raises(ValueError, match="pairs"):
        llm.load_weights(["model.norm.weight"])
    assert _tokens(llm) == reference


def test_recurrent_state_snapshot_pools_are_freed_and_come_back_zeroed(tmp_path):
    """A hybrid model's prefix-cache snapshot pools (recurrent states, held by each layer in a
    tuple) are part of the KV cache: sleep frees them (the pool tensors are gone), wake_up
    allocates them again, zeroed and as large, and a prompt extending an earlier one hits its
    snapshot in the new pool with HF's greedy tokens."""
    import gc
    import weakref

    from tests.models.test_mamba2 import mamba2_config
    from tests.models.test_recurrent_prefix_cache import PROMPTS as STATE_PROMPTS
    from tests.models.variant_parity import hf_reference, save_tiny

    path = save_tiny(mamba2_config(), str(tmp_path))
    names = ("a", "longer")
    want = hf_reference(path, [STATE_PROMPTS[n] for n in names], GREEDY.max_tokens)[0]
    with LLM(path, dtype="float32", block_size=4, enable_sleep_mode=True,
             recurrent_state_snapshots=4) as llm:
        mamba = llm.engine.core.runner.mamba

        def run():
            outs = [llm.generate({"prompt_token_ids": STATE_PROMPTS[n]}, GREEDY, use_tqdm=False)[0]
                    for n in names]
            return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]

        assert run() == (want, [0, 44])
        pools = [t for layer in mamba.layers for t in layer.snapshot_pools]
        shapes = [t.shape for t in pools]
        assert shapes[0][0] == 4 and any(t.any() for t in pools)  # a's snapshot is in them
        gone = [weakref.ref(t) for t in pools]
        del pools
        llm.sleep(level=1)
        gc.collect()
        assert all(r() is None for r in gone)  # nothing holds the old pools' memory
        assert all(t.numel() == 0 for layer in mamba.layers for t in layer.snapshot_pools)
        llm.wake_up()
        pools = [t for layer in mamba.layers for t in layer.snapshot_pools]
        assert [t.shape for t in pools] == shapes and not any(t.any() for t in pools)
        del pools
        assert run() == (want, [0, 44])  # the longer prompt restores a's state from the new pool
