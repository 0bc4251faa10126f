"""What vLLM's example scripts do, run on tessellm with the import renamed (docs/vllm_examples.md):
their ``FlexibleArgumentParser`` + ``EngineArgs.add_cli_args`` + ``LLM(**vars(args))`` pattern
with vLLM flags on the command line and ``--config``, ``None`` for "the engine's default",
Lark grammars, ``AsyncLLM.generate(sampling_params=...)`` and ``get_metrics``'s ``Vector``.
A tiny random llama with a small BPE tokenizer, on the cpu."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from tessellm import LLM, AsyncEngineArgs, AsyncLLM, EngineArgs, SamplingParams
from tessellm.config import CompilationConfig
from tessellm.inputs import TokensPrompt
from tessellm.metrics.reader import Counter, Vector
from tessellm.sampling_params import RequestOutputKind, StructuredOutputsParams
from tessellm.utils import FlexibleArgumentParser
from tessellm.utils.argparse_utils import FlexibleArgumentParser as FromArgparseUtils

SMALL = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64, enforce_eager=True)


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory) -> str:
    from tests.pooling.conftest import save_tokenizer

    path = str(tmp_path_factory.mktemp("vllm-examples") / "llama")
    shutil.copytree(tiny_model_dir("llama"), path)
    save_tokenizer(path)
    return path


def _parser(**defaults) -> FlexibleArgumentParser:
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(description="an example script"))
    parser.set_defaults(**defaults)
    return parser


def test_example_parser_takes_vllm_flags_config_and_underscores(model, tmp_path):
    """``LLM(**vars(args))`` of the examples' parser: vLLM-only flags given on the command line
    (``--trust-remote-code``, ``--disable-log-stats``, ``--swap-space``) reach ``LLM`` under their
    names; ``--config FILE.yaml`` and ``--flag_name`` work; the command line wins over the file."""
    assert FromArgparseUtils is FlexibleArgumentParser
    config = tmp_path / "c.yaml"
    config.write_text("max_num_seqs: 3\nmax-model-len: 128\n")
    parser = _parser(model=model, trust_remote_code=True, compilation_config=CompilationConfig(level=3),
                     **{k: v for k, v in SMALL.items() if k != "max_model_len"})
    args = parser.parse_args(["--trust-remote-code", "--swap_space", "4", "--disable-log-stats",
                              "--config", str(config), "--max-model-len", "64"])
    assert (args.max_num_seqs, args.max_model_len) == (3, 64)
    with LLM(**vars(args)) as llm:
        assert llm.llm_engine.model_config.max_model_len == 64
        assert llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 3
        out = llm.generate([TokensPrompt(prompt_token_ids=[5, 9, 11])],
                           SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3


def test_an_unread_config_flag_says_to_use_flexible_argument_parser(model):
    import argparse

    args = EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(["--config", "x.yaml"])
    with pytest.raises(ValueError, match="FlexibleArgumentParser"):
        LLM(model=model, **{k: v for k, v in vars(args).items() if k != "model"})


def test_profiler_config_is_refused_naming_the_trace_directory_settings(model):
    """vLLM's newer profiling example: ``LLM(profiler_config={...})``; tessellm's trace directory
    is an environment variable or ``stop_profile``'s argument."""
    with pytest.raises(ValueError, match="TESSELLM_TORCH_PROFILER_DIR"):
        LLM(model, profiler_config={"profiler": "torch", "torch_profiler_dir": "/tmp/p"}, **SMALL)


def test_none_means_the_engine_default(model):
    """vLLM's examples pass ``max_num_seqs=args.batch_size`` (None unless given), ``seed=None``."""
    args = AsyncEngineArgs(model=model, max_num_seqs=None, seed=None, block_size=None)
    defaults = EngineArgs(model=model)
    assert (args.max_num_seqs, args.seed, args.block_size) == (defaults.max_num_seqs, defaults.seed,
                                                               defaults.block_size)
    assert args.max_model_len is None  # None is already this field's default


LARK = """
    // vLLM's SQL example grammar, in Lark
    ?start: select_statement
    ?select_statement: "SELECT " column_list " FROM " table_name
    ?column_list: column_name ("," column_name)*
        | "*"
    ?table_name: identifier
    ?column_name: identifier
    ?identifier: /[a-z_][a-z0-9_]{0,3}/
    %ignore " "
"""


def test_lark_grammar_constrains_generation(model):
    """A Lark grammar (vLLM converts these for xgrammar; so does tessellm): every output is a
    whole sentence of its language (identifiers of at most 4 characters, so each one ends)."""
    params = [SamplingParams(max_tokens=80, temperature=1.0, seed=seed,
                             structured_outputs=StructuredOutputsParams(grammar=LARK)) for seed in range(4)]
    with LLM(model, **SMALL) as llm:
        outs = llm.generate(["Generate an SQL query."] * 4, params, use_tqdm=False)
    ident = r"[a-z_][a-z0-9_]{0,3}"  # %ignore " ": spaces may come before any token and at the end
    sentence = re.compile(rf" *SELECT +({ident}( *, *{ident})*|\*) +FROM +{ident} *")
    texts = [out.outputs[0].text for out in outs]
    assert all(out.outputs[0].finish_reason == "stop" for out in outs), texts
    assert all(sentence.fullmatch(text) for text in texts), texts
    assert len(set(texts)) > 1, texts  # sampled, not one fixed string


def test_lark_directives_and_a_missing_start_are_refused_by_name():
    from tessellm.structured_output.grammar import build_grammar

    with pytest.raises(ValueError, match="%declare is not supported"):
        build_grammar(StructuredOutputsParams(grammar="start: WORD\n%declare WORD"))
    with pytest.raises(ValueError, match="imports from outside Lark's common terminals"):
        build_grammar(StructuredOutputsParams(grammar="start: WORD\n%import python.NAME -> WORD"))
    with pytest.raises(ValueError, match="no 'start' rule"):
        build_grammar(StructuredOutputsParams(grammar='top: "a"'))


def test_async_generate_takes_sampling_params_by_name(model):
    """vLLM's async example: ``engine.generate(request_id=..., prompt=..., sampling_params=...)``
    with DELTA outputs, joined to the whole text."""

    async def run() -> tuple[str, str]:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **SMALL))
        try:
            delta = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                   output_kind=RequestOutputKind.DELTA)
            pieces = [c.text async for o in engine.generate(request_id="a", prompt="the cat sat",
                                                            sampling_params=delta) for c in o.outputs]
            final = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                   output_kind=RequestOutputKind.FINAL_ONLY)
            whole = [o async for o in engine.generate("the cat sat", final, "b")][-1].outputs[0].text
            return "".join(pieces), whole
        finally:
            await engine.shutdown()

    joined, whole = asyncio.run(run())
    assert joined == whole and whole


def test_async_shutdown_is_synchronous_as_vllms_and_awaitable(model):
    """vLLM's async example ends with a plain ``engine.shutdown()`` (no await): the core
    processes stop there and then, with no "never awaited" warning; awaiting it works too."""
    import warnings

    async def run(wait: bool):
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **SMALL))
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        async for _ in engine.generate("the cat", params, "a"):
            pass
        cores = engine.cores
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a coroutine never awaited would warn
            result = engine.shutdown()
            if wait:
                await result
        return engine, cores

    for wait in (False, True):
        engine, cores = asyncio.run(run(wait))
        assert engine.dead_reason == "shut down"
        for client in cores.clients:  # close() waited for them (bounded): the processes ended
            assert not client.proc.is_alive()
    engine.shutdown()  # again, outside any loop: a no-op


def test_async_shutdown_from_another_thread_cancels_on_the_engines_loop(model):
    """An engine served by an event loop in one thread, shut down from another (vLLM cancels its
    output handler thread-safely): the handlers are cancelled on their own loop (a debug loop
    refuses a cancel from another thread) and end."""
    import threading

    loop = asyncio.new_event_loop()
    loop.set_debug(True)  # non-thread-safe calls into the loop raise
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **SMALL))
        async for _ in engine.generate("the cat", SamplingParams(max_tokens=2, temperature=0), "a"):
            pass
        return engine

    try:
        engine = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=300)
        handlers = list(engine._handlers)
        assert handlers and not any(h.done() for h in handlers)
        engine.shutdown()  # this thread runs no loop
        asyncio.run_coroutine_threadsafe(asyncio.wait(handlers, timeout=30), loop).result(timeout=60)
        assert all(h.cancelled() for h in handlers)
        assert engine.dead_reason == "shut down"
        engine.shutdown()  # twice: a no-op
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_get_metrics_gives_accepted_tokens_per_position_as_a_vector(model):
    """vLLM's spec_decode example reads ``spec_decode_num_accepted_tokens_per_pos`` as a
    ``Vector`` (one count per draft position)."""
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
    with LLM(model, speculative_config=spec, disable_log_stats=False, **SMALL) as llm:
        llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6])],
                     SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
    per_pos = metrics["tessellm:spec_decode_num_accepted_tokens_per_pos"]
    accepted = metrics["tessellm:spec_decode_num_accepted_tokens"]
    assert isinstance(per_pos, Vector) and isinstance(accepted, Counter)
    assert len(per_pos.values) == 2 and sum(per_pos.values) == accepted.value
    assert metrics["tessellm:spec_decode_num_drafts"].value > 0
