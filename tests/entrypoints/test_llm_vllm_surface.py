"""vLLM's offline names beyond ``generate`` on the real engine (tiny random llama, cpu,
float32): ``llm.llm_engine`` and its config views, stepping the engine by hand,
``get_metrics``, ``RequestOutput``'s vLLM fields, ``use_tqdm`` callables, ``apply_model`` and
the profiler."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from tqdm.auto import tqdm

from tessellm import LLM, SamplingParams
from tessellm.inputs import TokensPrompt
from tessellm.metrics.reader import Counter, Histogram

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=128, max_num_seqs=8)
PROMPTS = [[5, 9, 11], [7, 3, 2, 8], [1, 2, 3, 4, 5]]


def _greedy(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model):
    with LLM(model, disable_log_stats=False, **ENGINE) as engine:  # as vLLM: get_metrics needs it
        yield engine


def test_llm_engine_and_its_config_views(llm):
    engine = llm.llm_engine
    assert engine is llm.engine
    assert engine.get_tokenizer() is None  # the tiny model has no tokenizer files
    mc = engine.model_config
    assert (mc.max_model_len, mc.dtype, mc.runner_type) == (512, torch.float32, "generate")
    assert (mc.get_vocab_size(), mc.get_hidden_size(), mc.hf_config.num_hidden_layers) == (384, 64, 2)
    vc = engine.vllm_config
    assert vc.model_config == mc
    assert (vc.cache_config.block_size, vc.cache_config.num_gpu_blocks) == (4, 128)
    assert vc.scheduler_config.max_num_seqs == 8
    assert (vc.parallel_config.tensor_parallel_size, vc.parallel_config.data_parallel_size) == (1, 1)


def test_stepping_the_engine_by_hand_gives_every_step(llm):
    """``llm.llm_engine.add_request`` + ``step()`` (vLLM's loop): an output per step, growing
    to what ``generate`` returns for the same prompt (generate itself returns finished ones)."""
    engine = llm.llm_engine
    engine.add_request("by-hand", TokensPrompt(prompt_token_ids=PROMPTS[0]), _greedy(4))
    seen = []
    while engine.has_unfinished_requests():
        seen += [list(o.outputs[0].token_ids) for o in engine.step() if o.request_id == "by-hand"]
    final = llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[0])], _greedy(4), use_tqdm=False)
    assert [len(ids) for ids in seen] == [1, 2, 3, 4]
    assert seen[-1] == final[0].outputs[0].token_ids


def _by_name(metrics) -> dict:
    out: dict = {}
    for m in metrics:
        key = (m.name, m.labels.get("finished_reason"))
        out[key] = m.value if isinstance(m, Counter) else m
    return out


def test_get_metrics_counts_what_ran(llm):
    before = _by_name(llm.get_metrics())
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _greedy(4), use_tqdm=False)
    after = _by_name(llm.get_metrics())

    def grew(name, reason=None):
        return after[(name, reason)] - before[(name, reason)]

    assert grew("tessellm:prompt_tokens") == sum(len(p) for p in PROMPTS)
    assert grew("tessellm:generation_tokens") == 4 * len(PROMPTS)
    assert grew("tessellm:request_success", "length") == len(PROMPTS)
    e2e = after[("tessellm:e2e_request_latency_seconds", None)]
    assert isinstance(e2e, Histogram) and e2e.count - before[(e2e.name, None)].count == len(PROMPTS)
    assert e2e.buckets["+Inf"] == e2e.count
    assert after[("tessellm:num_requests_running", None)].value == 0
    # each step's computed tokens: the prompts' uncached tokens, then one per decode step
    steps = after[("tessellm:iteration_tokens_total", None)]
    computed = sum(len(p) - o.num_cached_tokens + 3 for p, o in zip(PROMPTS, outs))
    assert steps.sum - before[(steps.name, None)].sum == computed and steps.count > before[(steps.name, None)].count


def test_metrics_are_kept_only_when_asked(model):
    """As vLLM's, ``LLM(...)`` feeds no Prometheus metrics unless ``disable_log_stats=False``
    (observing every token's latency costs host time in every step of a batch);
    ``get_metrics`` then says how to turn them on, and the outputs still carry their times."""
    with LLM(model, **ENGINE) as plain:
        assert plain.llm_engine.metrics is None
        with pytest.raises(ValueError, match="disable_log_stats=False"):
            plain.get_metrics()
        out = plain.generate([PROMPTS[0]], _greedy(2), use_tqdm=False)[0]
    assert out.metrics.num_generation_tokens == 2 and out.metrics.first_token_time is not None


def test_request_output_has_vllms_fields(llm):
    out = llm.generate([PROMPTS[1]], _greedy(3), use_tqdm=False)[0]
    times = out.metrics
    assert times.arrival_time <= times.first_scheduled_time <= times.first_token_time <= times.last_token_time
    assert (times.num_prompt_tokens, times.num_generation_tokens) == (4, 3)
    assert (out.lora_request, out.outputs[0].lora_request, out.kv_transfer_params) == (None, None, None)
    assert (out.encoder_prompt, out.encoder_prompt_token_ids, out.multi_modal_placeholders) == (None, None, {})


def test_use_tqdm_takes_a_progress_bar_factory(llm):
    made, updates = [], []

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, disable=True, **kwargs)
            made.append(self)

        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    outs = llm.generate(PROMPTS[:2], _greedy(2), use_tqdm=Bar)
    assert len(outs) == 2 and len(made) == 1
    assert made[0].total == 2 and sum(updates) == 2


def test_apply_model_runs_on_the_loaded_model(llm, model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    count = llm.apply_model(lambda m: sum(p.numel() for p in m.parameters()))
    assert count == [sum(p.numel() for p in hf.parameters())]


def test_profile_writes_a_trace_per_rank(llm, tmp_path):
    with pytest.raises(ValueError, match="start_profile"):
        llm.stop_profile()
    llm.start_profile()
    llm.generate([PROMPTS[0]], _greedy(2), use_tqdm=False)
    tables = llm.stop_profile(str(tmp_path))
    assert len(tables) == 1 and "Self CPU" in tables[0]
    (trace_file,) = tmp_path.glob("rank0.pid*.trace.json")
    trace = json.loads(trace_file.read_text())
    assert trace["traceEvents"]
    with pytest.raises(ValueError, match="stop_profile"):  # one at a time
        llm.start_profile()
        llm.start_profile()
    odd = tmp_path / "run{rank}{x}"  # braces in the directory are kept as they are
    llm.stop_profile(str(odd))
    assert list(odd.glob("rank0.pid*.trace.json"))


def test_async_engine_built_the_vllm_way(model):
    """``AsyncLLMEngine.from_engine_args(AsyncEngineArgs(...))`` with a vLLM-only argument, then
    ``generate(prompt, params, request_id)``: cumulative outputs, and DELTA ones that add up to
    the same tokens even when the consumer lags (untaken deltas are folded together)."""
    from tessellm import AsyncEngineArgs, AsyncLLMEngine
    from tessellm.lora.request import LoRARequest
    from tessellm.sampling_params import RequestOutputKind

    async def run():
        args = AsyncEngineArgs(model=model, device="cpu", dtype="float32", num_kv_blocks=32,
                               disable_log_stats=True)
        engine = AsyncLLMEngine.from_engine_args(args)
        try:
            prompt = TokensPrompt(prompt_token_ids=PROMPTS[2])
            whole = [o async for o in engine.generate(prompt, _greedy(8), "c")][-1]
            deltas = []
            async for out in engine.generate(prompt, _greedy(8).clone(output_kind=RequestOutputKind.DELTA), "d"):
                deltas.append(out)
                await asyncio.sleep(0.05)  # a slow consumer
            with pytest.raises(ValueError, match="enable_lora=True"):  # vLLM's lora_request keyword, checked
                await anext(engine.generate(prompt, _greedy(2), "l", lora_request=LoRARequest("a", 1, "/x")))
            return whole, deltas
        finally:
            await engine.shutdown()

    whole, deltas = asyncio.run(run())
    assert whole.finished and len(whole.outputs[0].token_ids) == 8
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    assert [t for d in deltas for t in d.outputs[0].token_ids] == whole.outputs[0].token_ids


def test_set_tokenizer_takes_text_prompts_from_then_on(model):
    """A model without tokenizer files, then vLLM's ``set_tokenizer``: text prompts are
    tokenized with it and the outputs' text is its decoding of the generated ids."""
    from tests.tiny_tokenizer import bpe_tokenizer

    tok = bpe_tokenizer(["hello world, the quick brown fox"] * 4, ["<s>"], vocab_size=300)
    with LLM(model, **ENGINE) as fresh:
        with pytest.raises(ValueError, match="no tokenizer"):
            fresh.generate("hello world", _greedy(2), use_tqdm=False)
        fresh.set_tokenizer(tok)
        assert fresh.get_tokenizer() is tok and fresh.llm_engine.get_tokenizer() is tok
        out = fresh.generate("hello world", _greedy(5), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.encode("hello world")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    tok.add_tokens([f"<extra{i}>" for i in range(500)])  # ids past the model's vocabulary (384)
    with LLM(model, **ENGINE) as fresh:
        with pytest.raises(ValueError, match="over the model's vocabulary of 384"):
            fresh.set_tokenizer(tok)
        assert fresh.get_tokenizer() is None
