"""Prefix caching for models with a per-request recurrent state (core/state_prefix.py), on tiny
random models (a Mamba2 model, and Qwen3-Next: gated DeltaNet with gated attention layers):
a later prompt sharing a cached prefix starts from the state snapshot at the hit's last block
(the hit counted in the request's ``num_cached_tokens``), and its greedy tokens equal HF
transformers' and a run without prefix caching, in float32: a prompt extending an earlier one,
a prefix ending inside a block (the hit is cut back to a snapshot), chunked prefill (a snapshot
at every chunk end on a block boundary), and snapshots and blocks evicted under memory
pressure. Nothing is mocked."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tests.core.test_state_prefix import check_pool
from tests.models.test_granite_moe_hybrid import granite_hybrid_config
from tests.models.test_mamba2 import mamba2_config
from tests.models.test_qwen3_next import qwen3_next_config
from tests.models.variant_parity import hf_reference, prompts, save_tiny

MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)
A = prompts((45,), seed=7)[0]
PROMPTS = {
    "a": A,
    "longer": A + prompts((6,), seed=8)[0],  # a's prompt, then more
    "inside": A[:42] + prompts((5,), seed=9)[0],  # shares 42 tokens: ends inside a block
    "inside2": A[:42] + prompts((5,), seed=15)[0],  # the same 42, another continuation
    "other1": prompts((44,), seed=10)[0],
    "other2": prompts((44,), seed=11)[0],
}
CONFIGS = {"mamba2": mamba2_config, "qwen3_next": qwen3_next_config}
MORE = {"granite4h": granite_hybrid_config}  # mamba_chunk_size 8: chunks across block ends


_HF: dict = {}


def hf(path: str, *names: str) -> dict:
    """HF's greedy tokens for the named prompts (each computed once per model)."""
    todo = [n for n in names if (path, n) not in _HF]
    if todo:
        for n, t in zip(todo, hf_reference(path, [PROMPTS[n] for n in todo], MAX_NEW)[0]):
            _HF[path, n] = t
    return {n: _HF[path, n] for n in names}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> the tiny model's directory, written once."""
    paths: dict = {}

    def get(name: str) -> str:
        if name not in paths:
            paths[name] = save_tiny({**CONFIGS, **MORE}[name](), str(tmp_path_factory.mktemp(name)))
        return paths[name]
    return get


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, saved):
    return saved(request.param)


@pytest.fixture(scope="module")
def mamba2(saved):
    """Eviction is the block manager's, whatever the layers: checked on the faster model."""
    return saved("mamba2")


def run(llm: LLM, *names: str):
    """Each prompt alone, in order (one after another: each sees the ones before cached)."""
    outs = [llm.generate([{"prompt_token_ids": PROMPTS[n]}], GREEDY, use_tqdm=False)[0]
            for n in names]
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]


def test_a_longer_prompt_starts_from_the_snapshot(model):
    path, want = model, hf(model, "a", "longer")
    with LLM(path, dtype="float32", block_size=4) as llm:
        tokens, cached = run(llm, "a", "longer", "a")
        kv = llm.engine.core.kv
        check_pool(kv)
        assert kv.states.num_restored == 2
    # a: 45 tokens, its state kept after 44; the longer prompt and a again start there
    assert cached == [0, 44, 44]
    assert tokens == [want["a"], want["longer"], want["a"]]
    with LLM(path, dtype="float32", block_size=4, enable_prefix_caching=False) as llm:
        assert run(llm, "a", "longer") == ([want["a"], want["longer"]], [0, 0])


@pytest.mark.parametrize("name", ["mamba2", "granite4h", "qwen3_next"])
def test_a_hit_runs_its_rest_in_one_step_saving_inside_it(saved, name):
    """longer (51 tokens) hits a's snapshot after 44 and computes 44 .. 51 in one step, its
    state after 48 saved inside that step (not a step up to 48, then the tail): a second
    longer hits 48 from it. Greedy tokens as HF's."""
    path = saved(name)
    want = hf(path, "a", "longer")
    with LLM(path, dtype="float32", block_size=4) as llm:
        core = llm.engine.core
        tokens, cached = run(llm, "a")
        core_step, steps = core.step, []

        def counted(*args, **kwargs):
            out = core_step(*args, **kwargs)
            steps.append(out)
            return out

        core.step = counted
        first = llm.generate([{"prompt_token_ids": PROMPTS["longer"]}],
                             SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                             use_tqdm=False)[0]
        num_steps = len(steps)
        core.step = core_step
        more, more_cached = run(llm, "longer")
        check_pool(core.kv)
    assert first.num_cached_tokens == 44 and list(first.outputs[0].token_ids) == want["longer"][:1]
    assert num_steps == 1
    assert cached + more_cached == [0, 48]
    assert tokens + more == [want["a"], want["longer"]]


@pytest.mark.parametrize("engine", [dict(max_num_batched_tokens=24, async_scheduling=True),
                                    dict(max_num_batched_tokens=64)], ids=["chunks-async", "whole"])
def test_batched_prompts_save_inside_steps(mamba2, engine):
    """Several prompts in one step, each saving inside it every 2 blocks (pieces of several
    sequences per scan call, their rows reordered), chunked prefill under async scheduling
    too: then prompts sharing their prefixes hit those snapshots; greedy tokens as without
    prefix caching."""
    first = ("a", "other1", "other2")
    then = ("longer", "inside", "inside2")
    kw = dict(dtype="float32", block_size=4, recurrent_state_snapshot_interval=2, **engine)

    def batched(llm, names):
        outs = llm.generate([{"prompt_token_ids": PROMPTS[n]} for n in names], GREEDY,
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]

    with LLM(mamba2, **kw) as llm:
        got = batched(llm, first), batched(llm, then)
        check_pool(llm.engine.core.kv)
    with LLM(mamba2, enable_prefix_caching=False, **kw) as llm:
        want = batched(llm, first), batched(llm, then)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert got[1][1] == [44, 40, 40]  # a's state after 44, and after 40 (its interval)


def test_chunked_prefill_keeps_a_snapshot_at_each_block_boundary_chunk_end(model):
    """Chunks of 16 tokens: a's states after 16, 32 and 44 are kept; a prompt sharing a's first
    42 tokens hits 10 KV blocks (40 tokens), cut back to the snapshot after 32."""
    path, want = model, hf(model, "a", "inside")
    with LLM(path, dtype="float32", block_size=4, max_num_batched_tokens=16) as llm:
        tokens, cached = run(llm, "a", "inside")
        check_pool(llm.engine.core.kv)
    assert cached == [0, 32]
    assert tokens == [want["a"], want["inside"]]


def test_snapshots_leave_with_their_evicted_blocks(mamba2):
    """A cache of 16 blocks (64 tokens): other1 evicts a's blocks past its first 3, and a's
    snapshot (after 44) with them; the longer prompt hits those 3 blocks with no snapshot in
    them, so it is computed whole, its first chunk ending after them (a snapshot at 12); a again
    then hits 12 tokens (its blocks past 12 are the longer prompt's, which kept no state at 44)."""
    names = ("a", "other1", "longer", "a")
    path, want = mamba2, hf(mamba2, *names)
    with LLM(path, dtype="float32", block_size=4, num_kv_blocks=16, recurrent_state_snapshots=4) as llm:
        tokens, cached = run(llm, *names)
        check_pool(llm.engine.core.kv)
    assert cached == [0, 0, 0, 12]
    assert tokens == [want[n] for n in names]


def test_a_full_snapshot_pool_gives_up_the_least_recently_used(mamba2):
    """2 snapshots, blocks to spare: other2's save takes a's snapshot (the least recently used),
    so a again has a KV hit of 44 tokens but no state to start from and is computed whole (its
    save takes other1's snapshot), and other2 then hits its own (after 40)."""
    names = ("a", "other1", "other2", "a", "other2")
    path, want = mamba2, hf(mamba2, *names)
    with LLM(path, dtype="float32", block_size=4, recurrent_state_snapshots=2) as llm:
        tokens, cached = run(llm, *names)
        check_pool(llm.engine.core.kv)
        pool = llm.engine.core.scheduler.stats().state_snapshots
    assert cached == [0, 0, 0, 0, 40]
    assert tokens == [want[n] for n in names]
    # The pool's metrics, from the scheduler's stats as the engine process sends them. Saves: a
    # at 44 and its decode at 48 (a free slot), other1 at 40 (taking a's decode snapshot, the
    # first to go; its own decode save finds no free slot), other2 at 40 (taking a's at 44), a
    # again at 44 (taking other1's): 5 saves, 3 evictions, other2's hit the one restore.
    assert pool == dict(slots=2, used=2, saves=5, restores=1, evictions=3)
    from prometheus_client import CollectorRegistry

    from tessellm.metrics.prometheus import EngineMetrics
    from tessellm.metrics.stats import EngineStats

    metrics = EngineMetrics("m", CollectorRegistry())
    metrics.observe_stats(EngineStats(state_snapshots=pool))
    text = metrics.render().decode()
    for line in ('recurrent_state_snapshot_slots{model_name="m"} 2.0',
                 'recurrent_state_snapshot_used{model_name="m"} 2.0',
                 'recurrent_state_snapshot_restores_total{model_name="m"} 1.0',
                 'recurrent_state_snapshot_saves_total{model_name="m"} 5.0',
                 'recurrent_state_snapshot_evictions_total{model_name="m"} 3.0'):
        assert "tessellm:" + line in text
    assert "recurrent_state_snapshot" not in EngineMetrics("m", CollectorRegistry()).render().decode()


def test_a_shared_prefix_gains_a_snapshot_where_a_second_prompt_leaves_it(model):
    """a keeps its state after 44; inside shares a's first 42 tokens: its KV hit (40) has no
    snapshot, so it is computed whole, its first chunk ending at 40 (a snapshot there); a third
    prompt sharing those 42 tokens (inside2) hits 40."""
    names = ("a", "inside", "inside2")
    path, want = model, hf(model, *names)
    with LLM(path, dtype="float32", block_size=4) as llm:
        tokens, cached = run(llm, *names)
        check_pool(llm.engine.core.kv)
    assert cached == [0, 0, 40]
    assert tokens == [want[n] for n in names]


def test_with_an_interval_the_second_request_sharing_a_prefix_hits(model):
    """recurrent_state_snapshot_interval=2: a is prefilled in chunks of 8 tokens, keeping the
    state after 8, 16, .., 40 and 44; inside, sharing a's first 42 tokens, then hits 40 (without
    the interval it is computed whole, above), starting from the snapshot after 40."""
    names = ("a", "inside")
    path, want = model, hf(model, *names)
    with LLM(path, dtype="float32", block_size=4, recurrent_state_snapshot_interval=2) as llm:
        tokens, cached = run(llm, *names)
        kv = llm.engine.core.kv
        check_pool(kv)
        assert kv.states.num_restored == 1
    assert cached == [0, 40]
    assert tokens == [want[n] for n in names]


def test_a_next_chat_turn_hits_through_the_answer(model):
    """A request keeps its state after the last block its decode steps fill (48 of a's 45 + 6
    tokens); the next turn (a, its answer, then more) hits 48: the prompt and the answer."""
    path = model
    first = hf(path, "a")["a"]
    turn = A + first + prompts((5,), seed=16)[0]
    want = hf_reference(path, [turn], MAX_NEW)[0][0]
    with LLM(path, dtype="float32", block_size=4) as llm:
        outs = [llm.generate([{"prompt_token_ids": p}], GREEDY, use_tqdm=False)[0] for p in (A, turn)]
        check_pool(llm.engine.core.kv)
    assert [o.num_cached_tokens for o in outs] == [0, 48]
    assert [list(o.outputs[0].token_ids) for o in outs] == [first, want]


@pytest.mark.slow
def test_tensor_parallel_hit(mamba2):
    """tensor_parallel_size=2 (gloo, worker processes): each rank keeps its heads' snapshots in
    its own pool, sized alike; the hit restores them on both. (The default suite's TP parity
    tests allocate the pools through the same calls.)"""
    names = ("a", "longer")
    path, want = mamba2, hf(mamba2, *names)
    with LLM(path, dtype="float32", block_size=4, device="cpu", tensor_parallel_size=2) as llm:
        tokens, cached = run(llm, *names)
    assert cached == [0, 44]
    assert tokens == [want[n] for n in names]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["mamba2", "granite4h"])
def test_cuda_hits_with_decode_graphs_and_async_scheduling(name, tmp_path):
    """On a CUDA GPU, where Mamba2-mixer models decode through captured graphs and the engine
    schedules one step ahead by default (block size 16): a 70-token prompt keeps its state
    after 64; a longer one and the same one again start there, one sharing only 40 tokens
    misses; then, in chunks of 16 (a snapshot after 16, 32, 48, 64), the longer one and the
    40-token sharer run together and hit 64 and 32. HF's tokens throughout; restores and saves
    run eagerly around the graphs."""
    from tests.models.test_granite_moe_hybrid import granite_hybrid_config
    from tests.models.test_mamba2 import hf_norms_each_group

    make = mamba2_config if name == "mamba2" else granite_hybrid_config
    config = make()
    if not hf_norms_each_group(config):  # older HF norms all groups at once
        config = make(**({"n_groups": 1} if name == "mamba2" else {"mamba_n_groups": 1}))
    path = save_tiny(config, str(tmp_path / name))
    a = prompts((70,), seed=12)[0]
    longer, inside = a + prompts((6,), seed=13)[0], a[:40] + prompts((5,), seed=14)[0]
    want = dict(zip(("a", "longer", "inside"), hf_reference(path, [a, longer, inside], MAX_NEW)[0]))

    def go(llm, *ps):
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]

    with LLM(path, device="cuda", dtype="float32", max_num_seqs=4) as llm:
        core = llm.engine.core
        assert core.async_scheduling and core.runner.graph_runner is not None
        got = [go(llm, p) for p in (a, longer, a, inside)]
    assert [c for _, (c,) in got] == [0, 64, 64, 0]
    assert [t for (t,), _ in got] == [want["a"], want["longer"], want["a"], want["inside"]]
    with LLM(path, device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=16) as llm:
        go(llm, a)
        tokens, cached = go(llm, longer, inside)
    assert cached == [64, 32]
    assert tokens == [want["longer"], want["inside"]]


@pytest.mark.interpreted  # the Triton ops on the cpu backend's host tensors
@pytest.mark.parametrize("name", ["mamba2", "granite4h", "qwen3_next"])
def test_triton_sequential_scan_saves_in_its_pass(saved, name, monkeypatch):
    """The cpu backend with the Triton ops' scan (``FusedOps.mamba_state_saves``; Qwen3-Next:
    the gated delta chunk op, ``gated_delta_state_saves``; Mamba2: the conv too,
    ``mamba_conv_state_saves``), in Triton's interpreter: a hit's
    rest (44 .. 51; Mamba: under ``SSD_MIN_TOKENS``, the sequential kernel) keeps the state
    after 48 inside the op's one launch per layer (not once per piece); a second longer hits
    48 from it. Greedy tokens as HF's."""
    pytest.importorskip("triton")
    from tessellm.backends.cpu.ops import CpuOps
    from tessellm.kernels.fused_ops import TritonOps
    from tessellm.kernels.gated_delta import chunk as delta_chunk
    from tessellm.kernels.mamba import chunk_scan

    delta = name == "qwen3_next"
    module, fn, op, flag, layer = (
        (delta_chunk, "gated_delta_chunk", "gated_delta_chunk", "gated_delta_state_saves",
         "GatedDeltaNet") if delta else
        (chunk_scan, "sequential_chunk_scan", "mamba_chunk_scan", "mamba_state_saves",
         "MambaMixer2"))
    scans, kernel = [], getattr(module, fn)

    def counted(*args, snapshots=None, **kwargs):
        scans.append(bool(args[6 if delta else 8].state_saves) and snapshots is not None)
        return kernel(*args, snapshots=snapshots, **kwargs)

    monkeypatch.setattr(module, fn, counted)
    if delta:  # TritonOps imports the kernel's function from the package
        import tessellm.kernels.gated_delta as package
        monkeypatch.setattr(package, fn, counted)
    triton_ops = TritonOps()
    monkeypatch.setattr(CpuOps, op, lambda self, *a, **kw: getattr(triton_ops, op)(*a, **kw))
    monkeypatch.setattr(CpuOps, flag, True, raising=False)
    # Mamba2: the Triton conv too (one model: ~1 s a call in the interpreter), keeping the
    # conv states in its state launch (``mamba_conv_state_saves``, API 23) in the steps that save
    convs, reference_conv = [], CpuOps.mamba_conv1d

    def conv(self, x, weight, bias, conv_state, batch, activation="silu", snapshots=None):
        convs.append(bool(batch.state_saves) and snapshots is not None)
        if not convs[-1]:
            return reference_conv(x, weight, bias, conv_state, batch, activation)
        return triton_ops.mamba_conv1d(x, weight, bias, conv_state, batch, activation,
                                       snapshots=snapshots)

    if name == "mamba2":
        monkeypatch.setattr(CpuOps, "mamba_conv1d", conv)
        monkeypatch.setattr(CpuOps, "mamba_conv_state_saves", True, raising=False)
    path = saved(name)
    want = hf(path, "a", "longer")
    with LLM(path, dtype="float32", block_size=4) as llm:
        tokens, cached = run(llm, "a", "longer", "longer")
        layers = sum(1 for m in llm.engine.core.runner.model.modules()
                     if type(m).__name__ == layer)
    assert layers and cached == [0, 44, 48]
    assert tokens == [want["a"], want["longer"], want["longer"]]
    # a saves at 44 inside its prefill, longer at 48: each one call per layer, saves in it
    assert sum(scans) == 2 * layers and len(scans) == 3 * layers
    assert sum(convs) == (2 * layers if name == "mamba2" else 0)
