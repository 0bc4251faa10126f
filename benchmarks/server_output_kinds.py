"""The API process's host work per engine step with many concurrent requests, on the CPU.

What the server asks of the engine decides how much the API process does per step: with
CUMULATIVE outputs each step builds, routes and diffs a whole-so-far output per running request;
with DELTA (streams) only the new tokens; with FINAL_ONLY (non-streamed requests) nothing until
the request ends. This runs the real serving path in one process, minus HTTP: ``AsyncLLM`` with
its engine core process (a tiny random Llama with SmolLM2's tokenizer: a cheap forward), and
``create_completion`` / ``create_chat_completion`` called as the routes call them, the streamed
responses' SSE bodies read to the end (what uvicorn would write to the socket). Every request
is greedy, ignores EOS and runs ``--tokens`` tokens, all ``--requests`` at once.

The figure is this process's CPU time (``time.process_time``: the engine core is another
process, so its model work is not in it), per engine step (the output messages the front end
routed) and per output token; the median of ``--rounds`` rounds. Run it against two trees to
compare (``PYTHONPATH=<tree> python benchmarks/server_output_kinds.py``): the script uses only
what both have.

Usage: python benchmarks/server_output_kinds.py [--requests 256] [--tokens 64] [--rounds 3]
       [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
PROMPT = "Once upon a time there was a little"
SCENARIOS = {  # name -> (route, body fields)
    "completions stream": ("completions", dict(stream=True)),
    "completions stream, logprobs 2, stop, usage": (
        "completions", dict(stream=True, logprobs=2, stop=["\n\n\n\n"],
                            stream_options={"include_usage": True, "continuous_usage_stats": True})),
    "completions": ("completions", {}),
    "chat stream": ("chat", dict(stream=True)),
    "chat": ("chat", {}),
}


def tiny_model(root: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tessellm.loader.default_model import default_model_path
    from tessellm.loader.gguf_loader import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(default_model_path())
    config = LlamaConfig(**SHAPE, vocab_size=len(tokenizer), tie_word_embeddings=False, initializer_range=0.1,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(4321)
    path = os.path.join(root, "llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class _Client:
    """What the routes ask of the HTTP request: the client never leaves."""

    async def is_disconnected(self) -> bool:
        return False


def _body(route: str, fields: dict, tokens: int) -> dict:
    body = dict(model="m", max_tokens=tokens, temperature=0, ignore_eos=True, **fields)
    if route == "chat":
        body["messages"] = [{"role": "user", "content": PROMPT}]
        if "logprobs" in body:
            body["top_logprobs"], body["logprobs"] = body.pop("logprobs"), True
    else:
        body["prompt"] = PROMPT
    return body


async def _one(engine, config, route: str, body: dict) -> int:
    """Runs one request to its end; returns the bytes of its response."""
    from tessellm.entrypoints.openai.serving_chat import create_chat_completion
    from tessellm.entrypoints.openai.serving_completion import create_completion

    create = create_chat_completion if route == "chat" else create_completion
    response = await create(engine, config, dict(body), _Client())
    if not body.get("stream"):
        return len(response.model_dump_json())
    size = 0
    async for event in response.body_iterator:
        size += len(event)
    return size


async def _round(engine, config, route: str, body: dict, requests: int) -> dict:
    steps = [0]
    route_outputs = engine._route

    def counted(outputs):
        steps[0] += bool(outputs)
        route_outputs(outputs)

    engine._route = counted
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        sizes = await asyncio.gather(*(_one(engine, config, route, body) for _ in range(requests)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        engine._route = route_outputs
    tokens = requests * body["max_tokens"]
    return dict(cpu_ms_per_step=1e3 * cpu / steps[0], cpu_us_per_token=1e6 * cpu / tokens, steps=steps[0],
                wall_s=wall, cpu_s=cpu, response_bytes=sum(sizes))


async def run(args) -> dict:
    import tessellm
    from tessellm.config import EngineArgs
    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.server_config import ServerConfig

    with tempfile.TemporaryDirectory() as root:
        per_request = args.tokens + 64  # the chat prompt's tokens and more
        engine = AsyncLLM(EngineArgs(model=tiny_model(root), device="cpu", dtype="float32",
                                     max_num_seqs=args.requests, max_model_len=per_request,
                                     num_kv_blocks=args.requests * (per_request // 16 + 1)))
        results: dict = {"tessellm": os.path.dirname(tessellm.__file__), "requests": args.requests,
                         "tokens": args.tokens, "scenarios": {}}
        try:
            engine.start()
            await engine.wait_until_warm(600)
            config = ServerConfig(["m"])
            for name, (route, fields) in SCENARIOS.items():
                body = _body(route, fields, args.tokens)
                await _round(engine, config, route, body, 8)  # warm the path
                rounds = [await _round(engine, config, route, body, args.requests) for _ in range(args.rounds)]
                summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
                results["scenarios"][name] = summary
                print(f"{name:48s} {summary['cpu_ms_per_step']:7.2f} ms/step  "
                      f"{summary['cpu_us_per_token']:6.1f} us/token  ({summary['steps']:.0f} steps, "
                      f"wall {summary['wall_s']:.1f} s)", flush=True)
        finally:
            await engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = asyncio.run(run(args))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
