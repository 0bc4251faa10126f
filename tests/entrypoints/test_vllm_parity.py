"""The vLLM names docs/vllm_parity.md's audit found missing or different, on the real engine
(tiny random llama, cpu, float32; a tiny llama whose tokenizer adds a BOS for the tokenizer
options): ``seed=-1`` is no seed, ``tokenization_kwargs``, ``beam_search(concurrency_limit=...)``,
``collective_rpc(kwargs=...)``, the newer ``SamplingParams`` names, chat ``reasoning_effort``'s
``enable_thinking``, the newer request fields and engine flags."""

from __future__ import annotations

import os

import pytest

from tessellm import LLM, SamplingParams
from tessellm.entrypoints.beam_search import BeamSearchParams
from tessellm.entrypoints.chat_utils import render_chat
from tessellm.entrypoints.cli import build_parser
from tessellm.entrypoints.openai.errors import OpenAIError
from tessellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from tessellm.entrypoints.openai.sampling import check_unsupported, reasoning_template_kwargs
from tessellm.entrypoints.vllm_args import pop_vllm_kwargs, vllm_engine_kwargs
from tests.server.test_add_special_tokens import BOS, TEXT, _make_bos_model

ENGINE = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=128, max_num_seqs=8)
PROMPT = [5, 9, 11, 7, 3, 2, 8, 1, 4, 6]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), **ENGINE) as engine:
        yield engine


@pytest.fixture(scope="module")
def bos_llm(tmp_path_factory):
    path = _make_bos_model(str(tmp_path_factory.mktemp("bos") / "model"))
    with LLM(path, **ENGINE) as engine:
        yield engine


def _greedy(max_tokens: int = 4, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def _ids(outs) -> list:
    return [list(o.outputs[0].token_ids) for o in outs]


# -- seed=-1 ------------------------------------------------------------------------------------

def test_seed_minus_one_is_no_seed(llm):
    """vLLM (and UIs that send ``"seed": -1``): -1 means unseeded. It was taken as seed -1: every
    such request drew the same 'random' tokens."""
    prompts = [{"prompt_token_ids": PROMPT}] * 4
    seeded = _ids(llm.generate(prompts, SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True),
                               use_tqdm=False))
    assert len({tuple(t) for t in seeded}) == 1  # a real seed: the same draw every time
    unseeded = _ids(llm.generate(prompts, SamplingParams(max_tokens=8, temperature=1.0, seed=-1, ignore_eos=True),
                                 use_tqdm=False))
    assert len({tuple(t) for t in unseeded}) > 1
    assert SamplingParams(seed=-1).seed is None


# -- tokenization_kwargs ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"truncate_prompt_tokens": 4}, {"truncation": True, "max_length": 4}])
def test_tokenization_kwargs_truncate_the_prompt(llm, kwargs):
    [cut] = llm.generate({"prompt_token_ids": PROMPT}, _greedy(), use_tqdm=False, tokenization_kwargs=kwargs)
    [short] = llm.generate({"prompt_token_ids": PROMPT[-4:]}, _greedy(), use_tqdm=False)
    assert list(cut.prompt_token_ids) == PROMPT[-4:]
    assert cut.outputs[0].token_ids == short.outputs[0].token_ids


@pytest.mark.parametrize("kwargs,named", [
    ({"padding": True}, "'padding'"),
    ({"max_length": 4}, "truncate_prompt_tokens"),
    ({"truncation": "only_second", "max_length": 4}, "truncation"),
    ({"truncation": True, "max_length": 0}, "max_length must be an integer >= 1"),
])
def test_tokenization_kwargs_not_read_are_refused_by_name(llm, kwargs, named):
    with pytest.raises(ValueError, match=named):
        llm.generate({"prompt_token_ids": PROMPT}, _greedy(), use_tqdm=False, tokenization_kwargs=kwargs)


@pytest.mark.parametrize("kwargs,named", [
    # vLLM silently takes max_length (or the context) over truncate_prompt_tokens here
    ({"truncate_prompt_tokens": 6, "truncation": True, "max_length": 4}, "truncate_prompt_tokens=6 and truncation=True"),
    ({"truncate_prompt_tokens": 6, "truncation": True}, "truncate_prompt_tokens=6 and truncation=True"),
    # vLLM keeps truncate_prompt_tokens for False, drops it for "do_not_truncate"
    ({"truncate_prompt_tokens": 4, "truncation": False}, "truncation=False .* and truncate_prompt_tokens=4"),
    ({"truncate_prompt_tokens": 4, "truncation": "do_not_truncate"}, "and truncate_prompt_tokens=4"),
    ({"truncation": False, "max_length": 4}, "truncation=False .* and max_length=4"),
])
def test_tokenization_kwargs_conflicting_cuts_are_refused_naming_both(llm, kwargs, named):
    """The two spellings of a cut in one call: were silently resolved (truncation=True's
    max_length won, truncation=False dropped truncate_prompt_tokens); now refused."""
    with pytest.raises(ValueError, match=named):
        llm.generate({"prompt_token_ids": PROMPT}, _greedy(), use_tqdm=False, tokenization_kwargs=kwargs)


def test_tokenization_kwargs_agreeing_cuts_and_truncation_alone(llm):
    """The same cut spelled both ways is taken; ``truncation=True`` without ``max_length`` keeps
    as many tokens as the context holds (vLLM's default max_length; was refused)."""
    [both] = llm.generate({"prompt_token_ids": PROMPT}, _greedy(), use_tqdm=False, tokenization_kwargs={
        "truncate_prompt_tokens": 4, "truncation": True, "max_length": 4})
    assert list(both.prompt_token_ids) == PROMPT[-4:]
    long = PROMPT * 60  # 600 tokens, past the context
    [whole] = llm.generate({"prompt_token_ids": long}, _greedy(1), use_tqdm=False,
                           tokenization_kwargs={"truncation": True})
    [minus_one] = llm.generate({"prompt_token_ids": long}, _greedy(1), use_tqdm=False,
                               tokenization_kwargs={"truncate_prompt_tokens": -1})
    assert list(whole.prompt_token_ids) == list(minus_one.prompt_token_ids)
    assert len(whole.prompt_token_ids) < len(long) and list(whole.prompt_token_ids) == long[-len(whole.prompt_token_ids):]


def test_tokenization_kwargs_add_special_tokens(bos_llm):
    tok = bos_llm.get_tokenizer()
    plain = tok.encode(TEXT, add_special_tokens=False)
    default, without = (bos_llm.generate(TEXT, _greedy(1), use_tqdm=False, tokenization_kwargs=kw)[0]
                        for kw in (None, {"add_special_tokens": False}))
    assert list(default.prompt_token_ids) == [BOS, *plain]
    assert list(without.prompt_token_ids) == plain and without.prompt == TEXT
    [upper] = bos_llm.generate(TEXT.upper(), _greedy(1), use_tqdm=False,
                               tokenization_kwargs={"do_lower_case": True, "add_special_tokens": False})
    assert list(upper.prompt_token_ids) == plain
    messages = [{"role": "user", "content": TEXT}]
    chat = [list(bos_llm.chat(messages, _greedy(1), use_tqdm=False, tokenization_kwargs=kw)[0].prompt_token_ids)
            for kw in (None, {"add_special_tokens": True})]
    assert chat == [plain, [BOS, *plain]]  # the template's text, and the BOS on top of it (vLLM's)
    cut = [list(bos_llm.chat(messages, _greedy(1), use_tqdm=False, tokenization_kwargs={
        "add_special_tokens": add, "truncate_prompt_tokens": 3})[0].prompt_token_ids) for add in (True, False)]
    assert cut == [[BOS, *plain[-2:]], plain[-3:]]  # the tokenizer's cut keeps its BOS (vLLM's left side)


def test_tokenization_kwargs_of_pooling(tiny_model_dir):
    with LLM(tiny_model_dir("llama"), runner="pooling", convert="embed", **ENGINE) as pooler:
        cut, short = (pooler.embed({"prompt_token_ids": p}, use_tqdm=False, tokenization_kwargs=kw)[0]
                      for p, kw in ((PROMPT, {"truncate_prompt_tokens": 4}), (PROMPT[:4], None)))
        assert list(cut.prompt_token_ids) == PROMPT[:4]  # a pooling model keeps the first tokens
        assert cut.outputs.embedding == pytest.approx(short.outputs.embedding)
        with pytest.raises(ValueError, match="'padding'"):
            pooler.encode({"prompt_token_ids": PROMPT}, pooling_task="embed", tokenization_kwargs={"padding": 1})


# -- beam_search and collective_rpc ------------------------------------------------------------

def test_beam_search_concurrency_limit_gives_the_same_beams(llm):
    prompts = [{"prompt_token_ids": PROMPT[:n]} for n in (3, 5, 7)]
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)

    def beams(outs):
        return [[(s.tokens, round(s.cum_logprob, 5)) for s in o.sequences] for o in outs]

    whole = beams(llm.beam_search(prompts, params))
    assert beams(llm.beam_search(prompts, params, None, False, 2)) == whole
    assert beams(llm.beam_search(prompts, params, use_tqdm=True, concurrency_limit=1)) == whole
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(prompts, params, concurrency_limit=0)


def test_collective_rpc_takes_vllms_kwargs(llm, tmp_path):
    [files] = llm.collective_rpc("save_sharded_state", kwargs={"path": str(tmp_path)})
    assert files and all(os.path.exists(f) for f in files)
    # a keyword past a defaulted parameter it leaves out (pattern) is sent in its place too
    [files] = llm.collective_rpc("save_sharded_state", kwargs={"path": str(tmp_path / "b"), "max_size": 1 << 30})
    assert files and all(os.path.exists(f) for f in files)
    # in this process the call runs to its end (vLLM's UniProcExecutor ignores timeout too)
    assert llm.collective_rpc("kv_block_bytes", timeout=5) == llm.collective_rpc("kv_block_bytes")
    for bad in (-1, "5", True):
        with pytest.raises(ValueError, match="give seconds >= 0"):
            llm.collective_rpc("kv_block_bytes", timeout=bad)
    with pytest.raises(ValueError, match="unexpected keyword argument 'nope'"):
        llm.collective_rpc("kv_block_bytes", kwargs={"nope": 1})


def test_world_size_and_cache_resets_of_vllm(llm):
    assert (llm.get_world_size(), llm.get_world_size(include_dp=False)) == (1, 1)
    llm.reset_mm_cache()
    llm.generate({"prompt_token_ids": PROMPT}, _greedy(), use_tqdm=False)
    assert llm.reset_prefix_cache(reset_running_requests=False, reset_connector=False)
    with pytest.raises(ValueError, match="reset_connector"):
        llm.reset_prefix_cache(reset_connector=True)


def test_reset_prefix_cache_preempts_running_requests(llm):
    """vLLM's ``reset_running_requests=True``: the running requests are preempted (recomputed
    later: the same greedy tokens) so the cache empties under load; without it nothing is done
    while a request holds blocks."""
    [alone] = llm.generate({"prompt_token_ids": PROMPT}, _greedy(12), use_tqdm=False)
    engine, core = llm.llm_engine, llm.engine.core
    engine.add_request("running", {"prompt_token_ids": PROMPT}, _greedy(12))
    outs = [o for _ in range(3) for o in engine.step()]
    assert core.kv.cached and core.kv.num_free_blocks < core.kv.num_blocks  # a cached prefix, blocks held
    assert not llm.reset_prefix_cache() and core.kv.cached  # nothing done
    preemptions = core.scheduler.num_preemptions_total
    assert llm.reset_prefix_cache(reset_running_requests=True)
    assert not core.kv.cached and core.kv.num_free_blocks == core.kv.num_blocks
    assert core.scheduler.num_preemptions_total == preemptions + 1
    while engine.has_unfinished_requests():
        outs += engine.step()
    [final] = [o for o in outs if o.finished]
    assert final.outputs[0].token_ids == alone.outputs[0].token_ids and len(alone.outputs[0].token_ids) == 12


@pytest.mark.parametrize("extra", [
    {"async_scheduling": True},
    {"async_scheduling": True, "speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                                      "prompt_lookup_max": 2}}], ids=["async", "async-ngram"])
def test_reset_running_requests_with_a_step_in_flight(tiny_model_dir, extra):
    """Under async scheduling (and with n-gram drafts) a step is always in flight: the running
    requests are preempted anyway (their in-flight results dropped when they come), every block
    is freed, the cache empties, and each finishes with the greedy tokens of a lone run."""
    prompts = [PROMPT, PROMPT[::-1]]
    with LLM(tiny_model_dir("llama"), **ENGINE, **extra) as llm:
        alone = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], _greedy(12), use_tqdm=False)]
        engine, core = llm.llm_engine, llm.engine.core
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, _greedy(12))
        outs = [o for _ in range(4) for o in engine.step()]
        assert len(core.scheduler.in_flight) and all(f"r{i}" in core.scheduler.in_flight for i in range(2))
        assert llm.reset_prefix_cache(reset_running_requests=True)
        assert not core.kv.cached and core.kv.num_free_blocks == core.kv.num_blocks
        while engine.has_unfinished_requests():
            outs += engine.step()
    done = {o.request_id: o.outputs[0].token_ids for o in outs if o.finished}
    assert [done["r0"], done["r1"]] == alone and all(len(t) == 12 for t in alone)


# -- SamplingParams' newer names -------------------------------------------------------------

@pytest.mark.parametrize("name,neutral,acting", [
    ("flat_logprobs", False, True),
    ("routed_experts_prompt_start", 0, 5), ("trace_decode_token_ids", None, [1, 2]),
])
def test_newer_sampling_params_are_neutral_or_refused_by_name(name, neutral, acting):
    SamplingParams(**{name: neutral})
    with pytest.raises(ValueError, match=f"{name}=.*not supported by tessellm"):
        SamplingParams(**{name: acting})


def test_a_fork_only_field_is_refused_by_name():
    """reasoning_eos_policy (vLLM PR #55562, closed unmerged; some forks carry it) is no vLLM
    field: refused by name offline and in a request (docs/vllm_parity.md)."""
    with pytest.raises(TypeError, match="reasoning_eos_policy"):
        SamplingParams(reasoning_eos_policy="force_end")
    with pytest.raises(ValueError, match="reasoning_eos_policy"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                              reasoning_eos_policy="force_end")


def test_vllm_conversions_of_sampling_params():
    assert (SamplingParams(logprobs=True).logprobs, SamplingParams(prompt_logprobs=True).prompt_logprobs) == (1, 1)
    p = SamplingParams.from_optional(logit_bias={"5": 250.0, 7: float("-inf")}, temperature=None)
    assert (p.logit_bias, p.temperature) == ({5: 100.0, 7: -100.0}, 1.0)
    with pytest.raises(ValueError, match="logit_bias keys"):
        SamplingParams.from_optional(logit_bias={"five": 1.0})
    for value in ("high", float("nan")):  # refused by token, not called a bad key nor made -100
        with pytest.raises(ValueError, match="logit_bias value for token 5 must be a number"):
            SamplingParams.from_optional(logit_bias={"5": value})


def test_temperature_edges_as_vllm(llm, caplog):
    """vLLM's SamplingParams: a temperature in (0, 0.01) is raised to 0.01 with a warning (it was
    sampled at the value given; below 1e-5 it was greedy), one above 2 is refused (it was sampled
    at); 0 stays greedy."""
    with caplog.at_level("WARNING", logger="tessellm.core.sampling_params"):
        tiny = SamplingParams(temperature=1e-6, max_tokens=4, ignore_eos=True, seed=5)
    assert (tiny.temperature, tiny.is_greedy) == (0.01, False)
    assert "raised to 0.01" in caplog.text
    assert SamplingParams(temperature=0).temperature == 0 and SamplingParams(temperature=2.0).temperature == 2.0
    for bad in (2.5, float("inf"), float("nan"), -0.1):
        with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\]"):
            SamplingParams(temperature=bad)
    [out] = llm.generate({"prompt_token_ids": PROMPT}, tiny, use_tqdm=False)
    [same] = llm.generate({"prompt_token_ids": PROMPT}, tiny.clone(temperature=0.01), use_tqdm=False)
    assert out.outputs[0].token_ids == same.outputs[0].token_ids  # sampled at 0.01, seeded alike


def test_stream_interval_and_skip_clone_change_nothing(llm):
    plain = _ids(llm.generate({"prompt_token_ids": PROMPT}, _greedy(), use_tqdm=False))
    extra = _greedy(stream_interval=3, skip_clone=True, skip_reading_prefix_cache=True)
    assert _ids(llm.generate({"prompt_token_ids": PROMPT}, extra, use_tqdm=False)) == plain
    with pytest.raises(ValueError, match="stream_interval"):
        SamplingParams(stream_interval=0)


# -- the server's request fields (validation only: no server needed) --------------------------

THINK_TEMPLATE = ("{% if enable_thinking is defined and enable_thinking %}c{% endif %}"
                  "{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.mark.parametrize("effort,kwargs,thinks", [
    (None, None, False), ("high", None, True), ("low", None, True), ("none", None, False),
    ("max", {"enable_thinking": False}, False),  # the request's own template kwargs win
])
def test_reasoning_effort_sets_enable_thinking(bos_llm, effort, kwargs, thinks):
    """vLLM's rule: ``reasoning_effort`` also sets ``enable_thinking`` (effort != "none") for
    templates that think only when asked; it was passed through alone (such a template never
    thought)."""
    req = ChatCompletionRequest(messages=[{"role": "user", "content": TEXT}], reasoning_effort=effort,
                                chat_template_kwargs=kwargs)
    tok = bos_llm.get_tokenizer()
    template_kwargs = reasoning_template_kwargs(req, kwargs, harmony=False)
    ids = render_chat(tok, [{"role": "user", "content": TEXT}], chat_template=THINK_TEMPLATE,
                      template_kwargs=template_kwargs)
    assert ids == tok.encode(("c" if thinks else "") + TEXT, add_special_tokens=False)
    if effort is not None:
        assert template_kwargs["reasoning_effort"] == effort


def test_served_chat_prompt_follows_reasoning_effort_and_tool_exclusion(bos_llm):
    """Through the real app (in process, AsyncLLM + engine core): the prompt a chat request
    renders, with vLLM's ``reasoning_effort`` rule and ``--exclude-tools-when-tool-choice-none``."""
    import asyncio

    from tessellm.entrypoints.openai.api_server import build_app
    from tessellm.entrypoints.openai.server_config import ServerConfig
    from tests.server.in_process import serve

    template = ("{% if enable_thinking is defined and enable_thinking %}c{% endif %}{% if tools %}b{% endif %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    tok = bos_llm.get_tokenizer()

    async def prompt_ids(client, **body):
        r = await client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": TEXT}], "max_tokens": 1,
            "return_token_ids": True, **body})
        assert r.status_code == 200, r.text
        return r.json()["prompt_token_ids"]

    async def scenario(client, engine):
        import httpx

        got = [await prompt_ids(client, reasoning_effort=e) for e in ("high", "none")]
        got.append(await prompt_ids(client, tools=tools, tool_choice="none"))
        excluding = build_app(engine, ServerConfig(["m"], chat_template=template,
                                                   exclude_tools_when_tool_choice_none=True))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=excluding), base_url="http://t",
                                     timeout=120) as other:
            got.append(await prompt_ids(other, tools=tools, tool_choice="none"))
            got.append(await prompt_ids(other, tools=tools, tool_choice="required"))
        return got

    args = bos_llm.engine.args
    got = asyncio.run(serve(args, scenario, with_engine=True, config=ServerConfig(["m"], chat_template=template)))
    assert got == [tok.encode(t + TEXT, add_special_tokens=False) for t in ("c", "", "b", "", "b")]


def test_reasoning_effort_beyond_gpt_oss_levels_is_refused_there():
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], reasoning_effort="max")
    with pytest.raises(OpenAIError, match="reasoning_effort 'max'"):
        reasoning_template_kwargs(req, None, harmony=True)


@pytest.mark.parametrize("cls,field,neutral,acting", [
    (CompletionRequest, "routed_experts_prompt_start", 0, 3),
    (ChatCompletionRequest, "routed_experts_prompt_start", 0, 3),
    (ChatCompletionRequest, "return_prompt_text", False, True),
])
def test_newer_request_fields_neutral_or_refused_by_name(cls, field, neutral, acting):
    body = {"prompt": "x"} if cls is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]}
    check_unsupported(cls(**body, **{field: neutral}, return_token_offsets=True, return_mm_kwargs=False))
    with pytest.raises(OpenAIError, match=f"'{field}' is not supported"):
        check_unsupported(cls(**body, **{field: acting}))


# -- engine flags ------------------------------------------------------------------------------

def test_newer_engine_flags(capsys):
    parser = build_parser()
    parser.parse_args(["serve", "--cudagraph-capture-sizes", "1", "2", "--max-cudagraph-capture-size", "8",
                       "--attention-config", "{}", "--nnodes", "1", "--no-enable-dbo", "--stream-interval", "4"])
    from tessellm.entrypoints.serve import _server_config

    args = parser.parse_args(["serve", "--fingerprint-mode", "none", "--cohere-format", "cmd3",
                              "--enable-offline-docs", "--exclude-tools-when-tool-choice-none"])
    assert _server_config(args).exclude_tools_when_tool_choice_none
    for argv, hint in ((["--attention-backend", "FLASH_ATTN"], "--device"),
                       (["--fingerprint-mode", "full"], "system_fingerprint")):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *argv])
        assert hint in capsys.readouterr().err
    _, kwargs = pop_vllm_kwargs({"max_cudagraph_capture_size": 8, "enable_return_routed_experts": False}, "m")
    assert kwargs == {}
    plain = vllm_engine_kwargs("m")
    assert vllm_engine_kwargs("m", fully_sharded_loras=True, lora_dtype="auto", shutdown_timeout=5) == plain
    with pytest.raises(ValueError, match=r"LLM\(lora_dtype=...\).*dtype="):
        vllm_engine_kwargs("m", lora_dtype="float16")
    with pytest.raises(ValueError, match=r"LLM\(nnodes=...\): 2 is not supported.*Ray"):
        pop_vllm_kwargs({"nnodes": 2}, "m")
