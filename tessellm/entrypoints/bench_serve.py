"""``tessellm bench serve``: online serving latency and throughput over real HTTP streaming.

Random-token prompts go to ``/v1/completions`` as token ids (``ignore_eos``, exactly
``--output-len`` tokens each), launched with Poisson arrivals at ``--request-rate`` (``inf``:
all at once). Per request it times the first streamed token (TTFT), the gaps between streamed
chunks (ITL) and the time per output token after the first (TPOT); it reports their mean, p50
and p99, request and output-token throughput, and the number of failed requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

_DEFAULT_VOCAB = 32000  # when the server does not report its vocabulary size


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from send to the first token
    latency: float = 0.0  # seconds from send to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks
    error: str = ""


def add_arguments(p) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--api-key", default=None, help="default: $TESSELLM_API_KEY")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (EOS ignored)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="draw prompt token ids from [0, V) (default: the server's, else 32000)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--output-json", default=None)
    p.add_argument("--passes", type=int, default=1,
                   help="run the workload this many times against the same server and report the "
                        "last; each pass's TTFT is kept under 'passes' (with --launch: pass 1 is the "
                        "cold server, the later ones the same server warm)")
    p.add_argument("--launch", action="store_true",
                   help="start `tessellm serve MODEL` with the engine flags below on --base-url's port, "
                   "time it to /ready, benchmark it, then stop it (SIGTERM)")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for /ready (--launch)")
    from tessellm.entrypoints.engine_args import add_engine_arguments

    add_engine_arguments(p)  # --seed also seeds the random prompts


def run(args) -> int:
    if min(args.num_prompts, args.input_len, args.output_len, args.passes) < 1 or args.request_rate <= 0:
        raise ValueError("--num-prompts, --input-len, --output-len, --passes and --request-rate "
                         "must be positive.")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no log line per request
    server = launch_server(args) if args.launch else None
    try:
        passes = [asyncio.run(benchmark(args, i)) for i in range(args.passes)]
        result = passes[-1]
        if len(passes) > 1:
            result["passes"] = [{"ttft_ms": r["ttft_ms"], "itl_ms": r["itl_ms"], "failed": r["failed"]}
                                for r in passes]
    finally:
        if server is not None:
            result_server = server.stop()
    if server is not None:
        result["server"] = {**server.summary(), **result_server}
    print(format_report(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["completed"] else 1


async def benchmark(args, pass_index: int = 0) -> dict:
    """One pass; each pass draws other prompts (no prefix-cache hits across passes)."""
    import httpx

    from tessellm import envs

    api_key = args.api_key or envs.api_key()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=args.timeout, limits=limits) as client:
        model, vocab = await _model_info(client, args)
        rng = random.Random(args.seed + 1_000_003 * pass_index)
        prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(_limited(gate, client, model, prompt, args.output_len)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, model, results, duration)


async def _model_info(client, args) -> tuple[str, int]:
    r = await client.get("/v1/models")
    r.raise_for_status()
    cards = r.json()["data"]
    card = next((c for c in cards if c["id"] == args.model), cards[0] if cards else {})
    model = args.model or card.get("id")
    if model is None:
        raise ValueError(f"The server at {args.base_url} lists no models; pass --model.")
    return model, args.vocab_size or card.get("vocab_size") or _DEFAULT_VOCAB


async def _limited(gate, client, model, prompt, output_len) -> RequestResult:
    if gate is None:
        return await send_request(client, model, prompt, output_len)
    async with gate:
        return await send_request(client, model, prompt, output_len)


async def send_request(client, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(prompt_len=len(prompt))
    chunks = 0
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue  # blank lines, keep-alive comments, the end
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = event["error"].get("message", "error event")
                    return res
                if event.get("usage"):
                    res.output_tokens = event["usage"]["completion_tokens"]
                if event.get("choices"):  # one chunk per engine step; text may be empty (no tokenizer)
                    now = time.perf_counter()
                    if chunks == 0:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last, chunks = now, chunks + 1
        res.latency = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks
        res.ok = chunks > 0
        if not res.ok:
            res.error = "no tokens were streamed"
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def _stats_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"mean": round(statistics.fmean(values) * 1e3, 3), "p50": round(pct(0.50) * 1e3, 3),
            "p99": round(pct(0.99) * 1e3, 3)}


def summarize(args, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "base_url": args.base_url, "model": model, "num_prompts": len(results),
        "input_len": args.input_len, "output_len": args.output_len,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency, "seed": args.seed,
        "duration_s": round(duration, 3), "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(out_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
        "ttft_ms": _stats_ms([r.ttft for r in ok]), "tpot_ms": _stats_ms(tpot),
        "itl_ms": _stats_ms([x for r in ok for x in r.itl]),
        "errors": errors[:10],
    }


def launch_server(args):
    from tessellm.entrypoints.bench_server import LaunchedServer

    return LaunchedServer.start(args)


def format_report(s: dict) -> str:
    rows = [("Model", s["model"]), ("Request rate (req/s)", s["request_rate"]),
            ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Duration (s)", s["duration_s"]), ("Total input tokens", s["total_input_tokens"]),
            ("Total output tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"]),
            ("Total token throughput (tok/s)", s["total_token_throughput"])]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms")):
        for stat in ("mean", "p50", "p99"):
            rows.append((f"{stat.capitalize() if stat == 'mean' else stat.upper()} {name} (ms)", s[key][stat]))
    lines = ["=" * 50, f"{'Serving benchmark':^50}", "=" * 50]
    lines += [f"{name:<36}{value!s:>14}" for name, value in rows]
    for i, p in enumerate(s.get("passes", ())):
        lines.append(f"{f'Pass {i + 1} TTFT p50 / p99 (ms)':<36}{p['ttft_ms']['p50']!s:>6} /{p['ttft_ms']['p99']!s:>7}")
    if s.get("server"):
        lines.append(f"{'Server time to /ready (s)':<36}{s['server']['time_to_ready_s']!s:>14}")
    if s["errors"]:
        lines.append("Errors: " + "; ".join(s["errors"]))
    lines.append("=" * 50)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="tessellm bench serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
