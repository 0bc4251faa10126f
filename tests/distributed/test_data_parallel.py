"""Data parallelism on one host (``data_parallel_size``): N engine cores behind one front end.

Offline (``LLM(data_parallel_size=2)``) and the serving front end (``AsyncLLM``): greedy outputs
equal to one engine's, requests spread over both cores, aborts reaching the core that holds the
request, and a killed core failing the engine clearly. The load balancer's policy is checked
on its own (plain Python). The HTTP server with ``-dp 2``: tests/server/test_data_parallel_server.py.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import EngineArgs
from tessellm.core.engine_process import EngineDeadError
from tessellm.core.load_balance import LoadBalancer

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(7 * i + j) % 90 + 3 for j in range(5 + i)]} for i in range(8)]


def _kwargs(**extra) -> dict:
    return dict(device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128, **extra)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


# -- the balancer ------------------------------------------------------------------------------

def test_balancer_spreads_and_releases():
    lb = LoadBalancer(2, block_size=4)
    picks = []
    for i in range(6):  # prompts shorter than a block: no affinity, least loaded, round-robin
        core = lb.pick([i, i + 1])
        lb.assign(f"r{i}", core, 2)
        picks.append(core)
    assert picks == [0, 1, 0, 1, 0, 1] and lb.num_requests == [3, 3] and lb.load == [6, 6]
    assert lb.release("r0") == 0 and lb.release("r0") is None
    assert lb.pick([9]) == 0  # now the least loaded
    assert lb.load == [4, 6] and lb.num_requests == [2, 3]


def test_balancer_weighs_tokens_not_requests():
    """One long request is more load than three short ones, and a request's generated tokens
    add to its core's load until it is released."""
    lb = LoadBalancer(2, block_size=4)
    lb.assign("long", 0, 3000)
    for i in range(3):
        lb.assign(f"short{i}", 1, 20)
    assert lb.pick(list(range(20))) == 1  # fewer tokens, though more requests
    lb.generated("short0", 5)
    lb.generated("long", 7)
    assert lb.load == [3007, 65]
    for _ in range(200):  # a long decode on core 1 makes it the busier one
        lb.generated("short1", 20)
    assert lb.load[1] > lb.load[0] and lb.pick(list(range(20))) == 0
    lb.release("short1")
    lb.generated("short1", 5)  # a late output of a released request: ignored
    assert lb.load == [3007, 45] and lb.num_requests == [1, 2]


def test_balancer_prefers_the_prefix_holder_while_loads_are_close():
    lb = LoadBalancer(2, block_size=4)
    shared = list(range(100, 108))  # two full blocks
    first = lb.pick(shared + [1])
    lb.assign("a", first, 9)
    # Same two leading blocks: the same core while it is at most 16 blocks of tokens (64 here:
    # more than two 9-token requests) above the other.
    for i in range(6):
        assert lb.pick(shared + [2]) == first
        lb.assign(f"b{i}", first, 9)
    assert lb.load[first] == 63
    lb.assign("c", first, 9)
    other = lb.pick(shared + [3])  # 72 tokens in flight there, 0 here: load wins
    assert other != first
    # A LoRA adapter is a link of its own: its requests gather where it went first, short
    # prompts too; another adapter's go to the least loaded core.
    lb = LoadBalancer(2, block_size=4)
    lora_core = lb.pick(list(range(50, 58)), lora_id=7)
    lb.assign("l1", lora_core, 8)
    assert lb.pick(list(range(60, 68)), lora_id=7) == lora_core
    assert lb.pick([1, 2], lora_id=7) == lora_core
    assert lb.pick([3, 4], lora_id=8) != lora_core


def test_balancer_tells_prompt_embeds_apart():
    """Prompts given as embeddings carry placeholder token ids (all 0): their affinity chain is
    keyed on the embeddings' hash, so different embeddings are not one shared prefix, and equal
    ones are."""
    import torch

    from tessellm.core.core_group import affinity_key
    from tessellm.core.engine_core import EngineCoreRequest
    from tessellm.core.prompt_embeds import PromptEmbeds

    def request(seed: int) -> EngineCoreRequest:
        embeds = PromptEmbeds.from_tensor(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed)),
                                          4, "float32")
        return EngineCoreRequest(f"r{seed}", [0] * 8, GREEDY, 0.0, prompt_embeds=embeds)

    lb = LoadBalancer(2, block_size=4)
    a, b, a2 = request(1), request(2), request(1)
    chain = lambda r: lb.chain(r.prompt_token_ids, None, affinity_key(r))  # noqa: E731
    assert chain(a) == chain(a2)
    assert not set(chain(a)) & set(chain(b))
    first = lb.pick(a.prompt_token_ids, None, affinity_key(a))
    lb.assign("a", first, 8)
    assert lb.pick(b.prompt_token_ids, None, affinity_key(b)) != first  # no shared prefix: least loaded
    assert lb.pick(a2.prompt_token_ids, None, affinity_key(a2)) == first


def test_data_parallel_rank_is_checked():
    with pytest.raises(ValueError, match="data_parallel_rank"):
        EngineArgs(data_parallel_size=2, data_parallel_rank=2).validate()
    with pytest.raises(ValueError, match="Ray Serve replicas"):
        EngineArgs(data_parallel_size=2, distributed_executor_backend="ray").validate()


# -- offline -----------------------------------------------------------------------------------

def test_offline_dp2(tiny_model_dir):
    """Greedy tokens equal dp=1's in input order, both cores ran prompts, and a killed core fails
    the engine with an error naming it (never a hang), then every later call too."""
    path = tiny_model_dir("llama")
    with LLM(path, **_kwargs()) as one:
        expected = _tokens(one.generate(PROMPTS, GREEDY, use_tqdm=False))
    with LLM(path, **_kwargs(data_parallel_size=2)) as two:
        got = two.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.request_id for o in got] == [str(i) for i in range(len(PROMPTS))]  # input order
        assert _tokens(got) == expected
        sent = two.engine.requests_sent()
        assert sent == [4, 4], sent
        # Each core really ran its share: its prefix-cache lookups count its prompts' tokens.
        queried = [s["prefix_cache_queries"] for s in two.engine.core_stats()]
        assert all(q > 0 for q in queried) and sum(queried) == sum(len(p["prompt_token_ids"]) for p in PROMPTS)
        # The engine goes on after a batch.
        assert _tokens(two.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == expected[:2]
        os.kill(two.engine.cores.pids()[1], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="engine core 1 of 2"):
            two.generate(PROMPTS, SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)
        with pytest.raises(EngineDeadError):  # and stays dead
            two.generate(PROMPTS[:1], GREEDY, use_tqdm=False)


# -- the serving front end ---------------------------------------------------------------------

def test_async_llm_dp2(tiny_model_dir):
    """Greedy streams equal dp=1's, both cores take requests, an abort frees the request in the
    core that holds it, sleep mode's calls answer for every core, and a killed core fails the
    in-flight requests and the health check."""
    from tessellm.entrypoints.async_llm import AsyncLLM

    path = tiny_model_dir("llama")
    with LLM(path, **_kwargs()) as one:
        expected = _tokens(one.generate(PROMPTS[:4], GREEDY, use_tqdm=False))
    engine = AsyncLLM(EngineArgs(model=path, data_parallel_size=2, kernel_warmup=False,
                                 enable_sleep_mode=True, **_kwargs()))

    async def collect(i):
        last = None
        async for out in engine.generate(PROMPTS[i], GREEDY, request_id=f"g{i}"):
            last = out
        return list(last.outputs[0].token_ids)

    async def scenario():
        engine.start()
        await engine.wait_until_warm(120)
        assert await engine.is_ready()
        assert await asyncio.gather(*(collect(i) for i in range(4))) == expected
        per_core = await engine.call_all("stats")
        assert all(s["prefix_cache_queries"] > 0 for s in per_core), per_core
        assert engine.cores.balancer.sent == [2, 2]
        # Abort: a long request on each core, then cancel the first; only its core frees it.
        long = SamplingParams(max_tokens=100, ignore_eos=True, temperature=0.0)
        streams = [engine.add_request(f"long{i}", PROMPTS[i], long) for i in range(2)]
        owners = [engine.cores.owner(f"long{i}") for i in range(2)]
        assert sorted(owners) == [0, 1]
        started = [False, False]
        while not all(started):  # both are running
            started = [seen or s.get_nowait() is not None for seen, s in zip(started, streams)]
            await asyncio.sleep(0.02)
        engine.abort("long0")
        for _ in range(100):
            running = [s["num_running"] for s in await engine.call_all("stats")]
            if running[owners[0]] == 0:
                break
            await asyncio.sleep(0.05)
        assert running[owners[0]] == 0 and running[owners[1]] == 1, running
        assert engine.cores.loads()[owners[0]] == 0
        # Sleep mode reaches every core: the busy core refuses, the idle one sleeps, and the
        # front end refuses requests until wake_up; a reset is done only if every core did it.
        assert not await engine.reset_prefix_cache()
        with pytest.raises(ValueError, match=f"engine core {owners[1]} of 2: sleep: 1 request"):
            await engine.sleep(1)
        assert engine.sleeping and await engine.is_sleeping()
        await engine.wake_up()
        assert not engine.sleeping and not await engine.is_sleeping()
        # Kill the core running a long request: its stream errors, the engine reports dead.
        stream = engine.add_request("long2", PROMPTS[1], long)
        owner = engine.cores.owner("long2")
        while stream.get_nowait() is None:
            await asyncio.sleep(0.02)
        os.kill(engine.cores.pids()[owner], signal.SIGKILL)
        with pytest.raises(EngineDeadError, match=f"engine core {owner} of 2"):
            async for _ in _drain(stream):
                pass
        assert engine.is_dead and not await engine.is_ready()
        with pytest.raises(EngineDeadError):
            engine.add_request("late", PROMPTS[0], GREEDY)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        engine.close()


async def _drain(stream):
    from tessellm.entrypoints.async_llm import iterate_streams

    async for item in iterate_streams([stream], stream.event):
        yield item


# -- on GPUs -------------------------------------------------------------------------------------

def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("tp", [1, 2])
def test_cuda_cores_take_their_own_devices(tiny_model_dir, tp):
    """Core r on devices r*tp .. r*tp+tp-1, greedy tokens equal one GPU's; more cores than the
    visible devices hold is refused with one sentence."""
    from tessellm.core.engine_process import EngineStartupError

    count = _cuda_count()
    if 2 * tp > count:
        pytest.skip(f"needs {2 * tp} CUDA GPUs")
    path = tiny_model_dir("llama-sharp")
    kw = dict(device="cuda", dtype="float32", num_kv_blocks=64, seed=0, max_model_len=128)
    with LLM(path, **kw) as one:
        expected = _tokens(one.generate(PROMPTS, GREEDY, use_tqdm=False))
    with LLM(path, data_parallel_size=2, tensor_parallel_size=tp, **kw) as two:
        devices = [client.info.devices for client in two.engine.cores.clients]
        assert devices == [[f"cuda:{r * tp + i}" for i in range(tp)] for r in range(2)], devices
        assert _tokens(two.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
        assert min(two.engine.requests_sent()) > 0
    cores = count // tp + 1
    with pytest.raises(EngineStartupError, match=f"needs {cores * tp} cuda devices, but {count} are visible"):
        LLM(path, data_parallel_size=cores, tensor_parallel_size=tp, **kw)
