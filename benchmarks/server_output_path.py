"""The API process's output path alone, per engine step, with many concurrent requests.

``server_output_kinds.py`` measures the whole serving path next to a real engine core; on a
busy 2-core machine its figures move by 20-30 % from run to run. This one takes the engine
core away: each step's ``EngineCoreOutput`` (one token per request; real token ids of SmolLM2's
tokenizer, so detokenizing costs what it costs) is made here and goes through the real front
end (``OutputProcessor``, ``RequestStream``) to the real consumers, on one asyncio loop:
a streamed request's SSE generator (``serving._sse_events`` over ``iterate_streams``, with its
renderer) and a whole one's ``serving.collect`` then its response body. The requests' sampling
params come from the server's own ``to_sampling_params``, so the tree that runs decides the
output kind (run it against two trees to compare; it uses only what both have).

The figure is CPU time (``time.process_time``) per step, the best of ``--rounds``.

Usage: python benchmarks/server_output_path.py [--requests 256] [--tokens 64 512] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

SCENARIOS = {  # name -> (route, request fields)
    "completions stream": ("completions", dict(stream=True)),
    "completions stream, logprobs 2": ("completions", dict(stream=True, logprobs=2)),
    "completions": ("completions", {}),
    "chat stream": ("chat", dict(stream=True)),
    "chat": ("chat", {}),
}


class _Engine:
    """What the renderers and ``collect`` ask of the engine: its tokenizer; aborts are no-ops
    (every request here runs to its end)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def abort(self, request_id: str) -> None:
        pass


class _Client:
    async def is_disconnected(self) -> bool:
        return False


def _view(engine, route: str, fields: dict, tokens: int, prompt_ids: list[int]):
    from tessellm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    from tessellm.entrypoints.openai.serving_chat import _ChatChunks, _ChatView
    from tessellm.entrypoints.openai.serving_completion import _CompletionChunks, _CompletionView

    body = dict(model="m", max_tokens=tokens, temperature=0, **fields)
    if route == "chat":
        if "logprobs" in body:
            body["top_logprobs"], body["logprobs"] = body.pop("logprobs"), True
        req = ChatCompletionRequest.model_validate({**body, "messages": [{"role": "user", "content": "hi"}]})
        view = _ChatView(engine, req, "m", "chatcmpl-1")
        view.prompt_tokens, view.prompt_ids = len(prompt_ids), prompt_ids
        return req, view, lambda: _ChatChunks(view)
    req = CompletionRequest.model_validate({**body, "prompt": "hi"})
    view = _CompletionView(engine, req, "m", "cmpl-1", ["hi"])
    return req, view, lambda: _CompletionChunks(view, 1)


async def _consume(engine, route: str, req, view, renderer, sub) -> int:
    from tessellm.entrypoints.async_llm import iterate_streams
    from tessellm.entrypoints.openai.serving import _sse_events, collect

    if req.stream:
        size = 0
        async for event in _sse_events(iterate_streams(sub.streams, sub.event), renderer(), False, lambda: None):
            size += len(event)
        return size
    outs = await collect(engine, sub, _Client(), 5.0)
    return len(view.response(outs[0] if route == "chat" else outs).model_dump_json())


async def _round(tokenizer, route: str, fields: dict, requests: int, tokens: int) -> float:
    from tessellm.core.engine_output import EngineCoreOutput
    from tessellm.core.output_processor import OutputProcessor
    from tessellm.core.sampling_params import RequestOutputKind
    from tessellm.entrypoints.async_llm import RequestStream
    from tessellm.entrypoints.openai.sampling import to_sampling_params
    from tessellm.entrypoints.openai.serving import Submitted

    rng = random.Random(0)
    vocab = [i for i in range(1000, 20000)]
    engine, processor, streams = _Engine(tokenizer), OutputProcessor(tokenizer), {}
    prompt_ids = tokenizer.encode("Once upon a time there was a little")
    consumers, ids = [], {}
    for r in range(requests):
        rid = f"r{r}"
        req, view, renderer = _view(engine, route, fields, tokens, prompt_ids)
        params = to_sampling_params(req, tokens, len(tokenizer))
        processor.add_request(rid, None, prompt_ids, params, [rid])
        event = asyncio.Event()
        streams[rid] = RequestStream(rid, event, params.output_kind == RequestOutputKind.DELTA)
        sub = Submitted([rid], [streams[rid]], event, [])
        ids[rid] = [rng.choice(vocab) for _ in range(tokens)]
        consumers.append(asyncio.ensure_future(_consume(engine, route, req, view, renderer, sub)))
    logprobs = "logprobs" in fields
    await asyncio.sleep(0)
    start = time.process_time()
    for step in range(tokens):
        outs = [EngineCoreOutput(rid, [ids[rid][step]], "length" if step == tokens - 1 else None,
                                 logprobs=[(ids[rid][step], -0.5, 1, [(ids[rid][step], -0.5), (7, -1.5)])]
                                 if logprobs else None) for rid in streams]
        results, _ = processor.process(outs)
        for result in results:
            streams[result.request_id].put(result)
        for _ in range(3):  # the consumers this woke run
            await asyncio.sleep(0)
    sizes = await asyncio.gather(*consumers)
    assert all(sizes), "a consumer produced nothing"
    return 1e3 * (time.process_time() - start) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    import tessellm
    from tessellm.loader.default_model import default_model_path
    from tessellm.loader.gguf_loader import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path())
    results = {"tessellm": os.path.dirname(tessellm.__file__), "requests": args.requests, "ms_per_step": {}}
    for tokens in args.tokens:
        for name, (route, fields) in SCENARIOS.items():
            best = min(asyncio.run(_round(tokenizer, route, fields, args.requests, tokens))
                       for _ in range(args.rounds))
            results["ms_per_step"][f"{name}, {tokens} tokens"] = best
            print(f"{name:36s} {tokens:4d} tokens  {best:7.2f} ms/step", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
