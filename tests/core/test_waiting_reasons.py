"""Why requests wait (vLLM's ``num_requests_waiting_by_reason``) and offline aborts counted
(``request_success_total{finished_reason="abort"}``), on a real engine (tiny random llama, cpu,
float32) stepped by hand and read through ``LLM.get_metrics()`` under both names.

vLLM's two reasons: ``capacity`` (the step had no room: KV blocks, token budget,
``max_num_seqs``) and ``deferred`` (passed over for a reason of the request's own: here a KV
connector lookup still under way). They add up to ``num_requests_waiting``."""

from __future__ import annotations

import threading

import pytest

from tessellm import LLM, SamplingParams
from tessellm.kv_transfer import register_kv_connector
from tessellm.kv_transfer.shared_storage import SharedStorageConnector
from tessellm.metrics.reader import Counter, Gauge

ENGINE = dict(device="cpu", dtype="float32", block_size=4, enforce_eager=True, disable_log_stats=False,
              metrics_names="both")
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
GATED = 7  # a prompt starting with this token waits for GatedLookups.gate


class GatedLookups(SharedStorageConnector):
    """The shared-storage connector whose lookups of GATED prompts stay under way (None) until
    the test opens the gate, as on a slow store: the scheduler passes those requests over."""

    gate = threading.Event()

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        if request.prompt_token_ids[0] == GATED and not GatedLookups.gate.is_set():
            return None
        return super().get_num_new_matched_tokens(request, num_computed_tokens)


def _gauges(llm) -> dict[tuple, float]:
    """(name, reason or None) -> value of the waiting gauges, both names."""
    out = {}
    for m in llm.get_metrics():
        if isinstance(m, Gauge) and m.name.split(":")[1].startswith("num_requests_waiting"):
            out[m.name, m.labels.get("reason")] = m.value
    return out


def _expect_waiting(llm, capacity: int, deferred: int) -> None:
    gauges = _gauges(llm)
    for prefix in ("tessellm:", "vllm:"):
        assert gauges[prefix + "num_requests_waiting_by_reason", "capacity"] == capacity, prefix
        assert gauges[prefix + "num_requests_waiting_by_reason", "deferred"] == deferred, prefix
        assert gauges[prefix + "num_requests_waiting", None] == capacity + deferred, prefix
    vllm = [m for m in llm.get_metrics() if m.name == "vllm:num_requests_waiting_by_reason"]
    assert {m.labels["engine"] for m in vllm} == {"0"}  # vLLM's labels: model_name, engine, reason


def _add(engine, prompts: dict[str, list[int]]) -> None:
    for rid, prompt in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": prompt}, PARAMS)


def _drain(engine) -> None:
    for _ in range(200):
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError("the requests did not finish")


def test_waiting_for_max_num_seqs_is_capacity(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), num_kv_blocks=64, max_num_seqs=1, **ENGINE) as llm:
        _expect_waiting(llm, 0, 0)  # exported at zero from the start
        _add(llm.llm_engine, {"a": [5, 9, 11], "b": [6, 3, 2], "c": [1, 2, 3]})
        llm.llm_engine.step()
        sched = llm.llm_engine.core.scheduler
        assert len(sched.running) == 1 and len(sched.waiting) == 2
        _expect_waiting(llm, 2, 0)
        _drain(llm.llm_engine)
        _expect_waiting(llm, 0, 0)


def test_waiting_for_kv_blocks_is_capacity(tiny_model_dir):
    """Six blocks of 4 tokens, prompts of 13 tokens (4 blocks each): the second waits for blocks
    while a seat (max_num_seqs) is free."""
    with LLM(tiny_model_dir("llama"), num_kv_blocks=6, max_num_seqs=8, **ENGINE) as llm:
        _add(llm.llm_engine, {"a": list(range(3, 16)), "b": list(range(20, 33))})
        llm.llm_engine.step()
        sched = llm.llm_engine.core.scheduler
        assert len(sched.running) == 1 and sched.kv.num_free_blocks < 4
        _expect_waiting(llm, 1, 0)
        _drain(llm.llm_engine)
        _expect_waiting(llm, 0, 0)


@pytest.fixture
def gated_kv(tmp_path):
    """A consumer's kv_transfer_config of GatedLookups over an empty store, its gate closed."""
    register_kv_connector("GatedLookups", f"{__name__}:GatedLookups")
    GatedLookups.gate.clear()
    yield {"kv_connector": "GatedLookups", "kv_role": "kv_consumer",
           "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)}}
    GatedLookups.gate.set()


def test_waiting_for_a_kv_connector_lookup_is_deferred(tiny_model_dir, gated_kv):
    """Two seats; g's connector lookup is held: a and b take the seats, g is deferred and c waits
    for capacity. Once the lookup answers (a miss), g runs; every request finishes."""
    with LLM(tiny_model_dir("llama"), num_kv_blocks=64, max_num_seqs=2, kv_transfer_config=gated_kv,
             **ENGINE) as llm:
        engine = llm.llm_engine
        _add(engine, {"g": [GATED, 9, 11, 4, 8], "a": [5, 9, 11], "b": [6, 3, 2], "c": [1, 2, 3]})
        engine.step()
        sched = engine.core.scheduler
        assert {r.request_id for r in sched.running} == {"a", "b"}
        _expect_waiting(llm, 1, 1)
        engine.step()  # still held: g stays deferred (taken, passed over again), c waits
        _expect_waiting(llm, 1, 1)
        GatedLookups.gate.set()
        _drain(engine)
        _expect_waiting(llm, 0, 0)
        assert not sched.deferred


def test_an_aborted_deferred_request_leaves_the_count(tiny_model_dir, gated_kv):
    with LLM(tiny_model_dir("llama"), num_kv_blocks=64, kv_transfer_config=gated_kv, **ENGINE) as llm:
        engine = llm.llm_engine
        _add(engine, {"g": [GATED, 9, 11, 4, 8], "a": [5, 9, 11]})
        engine.step()
        _expect_waiting(llm, 0, 1)
        engine.abort_request("g")
        _expect_waiting(llm, 0, 0)
        _drain(engine)


def _aborts(llm) -> dict[str, int]:
    return {m.name: m.value for m in llm.get_metrics()
            if isinstance(m, Counter) and m.name.endswith("request_success")
            and m.labels["finished_reason"] == "abort"}


def test_offline_abort_is_counted_once_per_sample(tiny_model_dir):
    """``LLMEngine.abort_request`` counts the request's unfinished samples as finished with
    "abort", as the server's aborts do (vLLM counts each of n samples as a request): a running
    n=2 request 2, a waiting one 1, a finished one or a second abort nothing."""
    with LLM(tiny_model_dir("llama"), num_kv_blocks=64, max_num_seqs=2, **ENGINE) as llm:
        engine = llm.llm_engine
        engine.add_request("two", {"prompt_token_ids": [5, 9, 11]},
                           SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=50, ignore_eos=True))
        _add(engine, {"waits": [6, 3, 2], "done": [1, 2]})
        engine.step()
        assert _aborts(llm) == {"tessellm:request_success": 0, "vllm:request_success": 0}
        engine.abort_request("two")
        engine.abort_request(["two", "waits"])  # vLLM's takes a list; "two" again counts nothing
        assert _aborts(llm) == {"tessellm:request_success": 3, "vllm:request_success": 3}
        _drain(engine)
        engine.abort_request("done")  # finished already: not counted
        assert _aborts(llm) == {"tessellm:request_success": 3, "vllm:request_success": 3}
        success = {m.labels["finished_reason"]: m.value for m in llm.get_metrics()
                   if m.name == "tessellm:request_success"}
        assert success["length"] == 1
