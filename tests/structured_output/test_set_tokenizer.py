"""``LLM.set_tokenizer`` (vLLM's) reaches structured output: grammars of later requests are
compiled against the new tokenizer's vocabulary (the output, decoded with it, follows the
constraint); the same vocabulary keeps the compile cache; a data-parallel engine, whose cores
compile in other processes, has them load the tokenizer by name, and refuses constrained requests
while the vocabularies differ (a tokenizer with no name, or whose name loads another)."""

from __future__ import annotations

import re

import pytest

from tessellm import LLM, SamplingParams
from tessellm.structured_output import StructuredOutputsParams

pytest.importorskip("xgrammar")

REGEX = r"(cat|mat) [0-9]{2}"


def _constrained(seed: int = 0) -> SamplingParams:
    return SamplingParams(max_tokens=16, temperature=1.0, seed=seed,
                          structured_outputs=StructuredOutputsParams(regex=REGEX))


def _texts(llm: LLM) -> list[str]:
    outs = llm.generate(["the cat sat"] * 3, [_constrained(seed) for seed in range(3)], use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def _other_vocabulary():
    """A tokenizer whose every id means other text than the model's tokenizer's: two more
    special tokens first (ids 0-4) shift every byte and merge, trained on other text."""
    from tests.pooling.conftest import CHAT_TEMPLATE
    from tests.tiny_tokenizer import bpe_tokenizer

    corpus = ["pack my box with five dozen liquor jugs", "sphinx of black quartz, judge my vow"]
    return bpe_tokenizer(corpus * 20, ["<pad>", "<s>", "</s>", "<x>", "<y>"], 300, CHAT_TEMPLATE,
                         bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_grammars_follow_set_tokenizer(tiny_llm_args):
    from transformers import AutoTokenizer

    other = _other_vocabulary()
    with LLM(**tiny_llm_args) as llm:
        own = llm.get_tokenizer()
        assert other.get_vocab() != own.get_vocab()
        assert all(re.fullmatch(REGEX, t) for t in _texts(llm))  # compiled against the model's
        llm.set_tokenizer(other)
        texts = _texts(llm)
        assert all(re.fullmatch(REGEX, t) for t in texts), texts
        # the ids the grammar allowed are other's: the model's tokenizer reads other text
        outs = llm.generate(["the cat sat"], _constrained(), use_tqdm=False)[0].outputs[0]
        assert other.decode(outs.token_ids, skip_special_tokens=True) == outs.text
        assert own.decode(outs.token_ids, skip_special_tokens=True) != outs.text

        llm.set_tokenizer(own)
        assert all(re.fullmatch(REGEX, t) for t in _texts(llm))
        structured = llm.engine.core.structured
        compiles = structured.pool.num_compiles
        llm.set_tokenizer(AutoTokenizer.from_pretrained(tiny_llm_args["model"]))  # the same vocabulary
        assert all(re.fullmatch(REGEX, t) for t in _texts(llm))
        assert structured.pool.num_compiles == compiles  # the compile cache was kept


def test_data_parallel_refuses_constrained_requests_under_another_vocabulary(tiny_llm_args):
    with LLM(**tiny_llm_args, data_parallel_size=2) as llm:
        own = llm.get_tokenizer()
        llm.set_tokenizer(_other_vocabulary())
        with pytest.raises(ValueError, match="set_tokenizer gave a tokenizer whose vocabulary differs"):
            llm.generate(["the cat sat"], _constrained(), use_tqdm=False)
        plain = SamplingParams(max_tokens=2, temperature=0.0)
        assert len(llm.generate(["the cat sat"], plain, use_tqdm=False)[0].outputs[0].token_ids) == 2
        llm.set_tokenizer(own)
        out = llm.generate(["the cat sat"], _constrained(), use_tqdm=False)[0].outputs[0]
        assert re.fullmatch(REGEX, out.text), out.text


def test_data_parallel_cores_load_a_tokenizer_by_name(tiny_llm_args, tmp_path):
    """``set_tokenizer`` with a tokenizer loaded from a directory: each core loads it by that
    name, so constrained requests follow its vocabulary on both cores; outputs that arrive
    while the front end waits for the cores are kept for the next step; a name that no longer
    loads, or loads another vocabulary than the one given, keeps the refusal, naming why."""
    from transformers import AutoTokenizer

    _other_vocabulary().save_pretrained(tmp_path / "other")
    named = AutoTokenizer.from_pretrained(tmp_path / "other")
    with LLM(**tiny_llm_args, data_parallel_size=2) as llm:
        own, engine = llm.get_tokenizer(), llm.llm_engine
        engine.add_request("during", "the cat sat", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        llm.set_tokenizer(named)
        finished = []
        while engine.has_unfinished_requests():
            finished += [o for o in engine.step() if o.finished]
        assert [(o.request_id, len(o.outputs[0].token_ids)) for o in finished] == [("during", 8)]

        outs = llm.generate(["the cat sat"] * 4, [_constrained(seed) for seed in range(4)], use_tqdm=False)
        assert all(n > 0 for n in engine.requests_sent())  # both cores compiled against it
        for out in (o.outputs[0] for o in outs):
            assert re.fullmatch(REGEX, out.text), out.text
            assert named.decode(out.token_ids, skip_special_tokens=True) == out.text
            assert own.decode(out.token_ids, skip_special_tokens=True) != out.text

        changed = AutoTokenizer.from_pretrained(tmp_path / "other")
        changed.add_tokens(["<added-in-memory>"])  # its name loads the vocabulary without it
        llm.set_tokenizer(changed)
        with pytest.raises(ValueError, match="loads another vocabulary than the tokenizer given"):
            llm.generate(["the cat sat"], _constrained(), use_tqdm=False)
        gone = AutoTokenizer.from_pretrained(tmp_path / "other")
        gone.name_or_path = str(tmp_path / "missing")
        llm.set_tokenizer(gone)
        with pytest.raises(ValueError, match="engine core 0 of 2: the tokenizer .*missing.* could not be loaded"):
            llm.generate(["the cat sat"], _constrained(), use_tqdm=False)

        llm.set_tokenizer(own)  # by name too: the model's directory
        out = llm.generate(["the cat sat"], _constrained(), use_tqdm=False)[0].outputs[0]
        assert re.fullmatch(REGEX, out.text) and own.decode(out.token_ids, skip_special_tokens=True) == out.text


async def _async_scenario(args: dict, named, unnamed):
    """AsyncLLM (the server's engine, its core in another process) through set_tokenizer: a
    tokenizer loaded by name; one with no name; the model's again."""
    from tessellm.config import EngineArgs
    from tessellm.entrypoints.async_llm import AsyncLLM

    engine = AsyncLLM(EngineArgs(**args))
    seen = {}

    async def run(tag: str, params: SamplingParams):
        async for out in engine.generate("the cat sat", params, request_id=tag):
            seen[tag] = out
        return seen[tag]

    try:
        engine.start()
        own = engine.tokenizer
        with pytest.raises(ValueError, match="over the model's vocabulary"):
            big = _other_vocabulary()
            big.add_tokens([f"<extra{i}>" for i in range(engine.info.vocab_size)])
            await engine.set_tokenizer(big)
        assert engine.tokenizer is own  # refused: nothing changed

        await _refused_while_the_core_loads(engine, named)
        out = await run("named", _constrained())
        assert out.prompt_token_ids == named.encode("the cat sat")  # tokenized with it
        text = out.outputs[0].text
        assert re.fullmatch(REGEX, text) and named.decode(out.outputs[0].token_ids, skip_special_tokens=True) == text

        await engine.set_tokenizer(unnamed)
        with pytest.raises(ValueError, match="it has no name"):
            await run("unnamed", _constrained())
        plain = await run("plain", SamplingParams(max_tokens=2, temperature=0.0))
        assert len(plain.outputs[0].token_ids) == 2

        await engine.set_tokenizer(own)
        out = await run("own", _constrained())
        assert re.fullmatch(REGEX, out.outputs[0].text) and out.prompt_token_ids == own.encode("the cat sat")
    finally:
        await engine.shutdown()


async def _loading(engine, tokenizer):
    """``set_tokenizer(tokenizer)`` started, awaiting the core's answer."""
    import asyncio

    call = asyncio.ensure_future(engine.set_tokenizer(tokenizer))
    for _ in range(1000):
        if engine.inputs.structured_loading:
            return call
        await asyncio.sleep(0)
    raise AssertionError("set_tokenizer never asked the core")


async def _refused_while_the_core_loads(engine, named):
    """While the core loads ``named`` the front end already tokenizes with it: a constrained
    request is refused (the server's 503, retry), a plain one served; a call cancelled half-way
    leaves constrained requests refused, naming it, until set_tokenizer settles again."""
    from tessellm.core.core_tokenizer import TokenizerLoadingError
    from tessellm.entrypoints.openai.serving import engine_error

    cancelled = await _loading(engine, named)
    cancelled.cancel()
    with pytest.raises(BaseException):
        await cancelled
    with pytest.raises(ValueError, match="cancelled before it answered"):
        engine.add_request("after-cancel", "the cat sat", _constrained())

    call = await _loading(engine, named)
    with pytest.raises(TokenizerLoadingError, match="loading a new tokenizer") as refused:
        engine.add_request("during", "the cat sat", _constrained())
    error = engine_error(refused.value)
    assert (error.status, error.param, error.code) == (503, "structured_outputs", "tokenizer_loading")
    engine.add_request("plain-during", "the cat sat", SamplingParams(max_tokens=2))
    engine.abort("plain-during")
    await call
    assert not engine.inputs.structured_loading and engine.inputs.structured_refusal is None


def test_async_llm_set_tokenizer(tiny_llm_args, tmp_path):
    """``AsyncLLM.set_tokenizer``, with LLM's semantics: later prompts are tokenized and outputs
    detokenized with it; its ids must fit the model; grammars follow its vocabulary in the core
    process (loaded there by name), and a tokenizer the core cannot load by name keeps
    constrained requests refused, naming why, while plain ones are served."""
    import asyncio

    from transformers import AutoTokenizer

    _other_vocabulary().save_pretrained(tmp_path / "other")
    named = AutoTokenizer.from_pretrained(tmp_path / "other")
    unnamed = _other_vocabulary()  # built in memory: no name_or_path
    unnamed.add_tokens(["<added-in-memory>"])  # not the vocabulary the core holds
    asyncio.run(_async_scenario(tiny_llm_args, named, unnamed))


def _named(path, special: list[str]):
    """A tiny tokenizer saved to ``path`` and loaded back: it has a name the cores load it by."""
    from transformers import AutoTokenizer

    from tests.tiny_tokenizer import bpe_tokenizer

    corpus = ["pack my box with five dozen liquor jugs", "the cat sat on the mat"]
    bpe_tokenizer(corpus * 20, special, 300, eos_token=special[-1]).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_core_tokenizer_unknown_after_a_call_the_cores_may_still_act_on(tmp_path):
    """``CoreTokenizer`` keeps what the cores hold only where they said: a core that could not
    load the tokenizer kept its own (a later set_tokenizer of that one asks nothing), but a core
    that did not answer in time (it may load it later) or a call abandoned half-way (the caller
    cancelled) leaves the cores' vocabulary unknown, so setting the old tokenizer again asks the
    cores rather than letting constrained requests through against the other vocabulary."""
    from tessellm.core.core_tokenizer import CoreTokenizer, set_core_tokenizer, vocabulary_digest

    own, other = _named(tmp_path / "own", ["<s>", "</s>"]), _named(tmp_path / "other", ["<pad>", "<s>", "</s>"])
    assert vocabulary_digest(own) != vocabulary_digest(other)
    cores = CoreTokenizer(own)
    assert cores.ask(own) is None  # they hold it

    gone = _named(tmp_path / "gone", ["<pad>", "<s>", "</s>"])
    gone.name_or_path = str(tmp_path / "missing")
    answer = set_core_tokenizer(None, *cores.ask(gone))  # the core's own answer: it kept its tokenizer
    assert "could not be loaded" in cores.settle(gone, [answer], ["engine core"])
    assert cores.ask(own) is None  # still the model's at the core

    late = {"error": "no answer to 'set_tokenizer' within 120s"}  # the front end's, on a timeout
    assert cores.ask(other) == [str(tmp_path / "other")]
    assert "within 120s" in cores.settle(other, [late], ["engine core"])
    assert cores.ask(own) == [str(tmp_path / "own")]  # the core may hold other's by now: asked
    assert cores.settle(own, [{"result": vocabulary_digest(own)}], ["engine core"]) is None

    assert cores.ask(other) is not None  # sent, then the caller is cancelled: never settled
    assert cores.ask(own) == [str(tmp_path / "own")]


async def _overlapping_scenario(args: dict, named):
    """Three set_tokenizer calls, the second still in flight (its core loading the model's
    tokenizer) when the first returns and the third is made: the third, the last, wins in the
    front end and in the core alike."""
    import asyncio

    from tessellm.config import EngineArgs
    from tessellm.entrypoints.async_llm import AsyncLLM

    engine = AsyncLLM(EngineArgs(**args))
    try:
        engine.start()
        own = engine.tokenizer
        first = asyncio.ensure_future(engine.set_tokenizer(named))
        second = asyncio.ensure_future(engine.set_tokenizer(own))
        await first
        await engine.set_tokenizer(named)
        await second
        assert engine.tokenizer is named
        out = None
        async for out in engine.generate("the cat sat", _constrained(), request_id="after"):
            pass
        text = out.outputs[0].text
        assert re.fullmatch(REGEX, text), text  # the core's grammar is named's vocabulary too
    finally:
        await engine.shutdown()


def test_async_llm_set_tokenizer_calls_take_turns(tiny_llm_args, tmp_path):
    import asyncio

    from transformers import AutoTokenizer

    _other_vocabulary().save_pretrained(tmp_path / "other")
    asyncio.run(_overlapping_scenario(tiny_llm_args, AutoTokenizer.from_pretrained(tmp_path / "other")))
