"""The ``tessellm`` command: serve, generate, backends, bench."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessellm", description="LLM inference and serving engine.")
    parser.add_argument("--log-level", default="INFO", help="Python logging level.")
    sub = parser.add_subparsers(dest="command", required=True)

    from tessellm.entrypoints import serve

    serve.add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP server."))
    serve.add_generate_arguments(sub.add_parser("generate", help="Generate from one prompt, streamed."))

    backends = sub.add_parser("backends", help="List discovered backends and their plugins.")
    backends.add_argument("--verbose", "-v", action="store_true", help="Show which plugin provides each piece.")

    bench = sub.add_parser("bench", help="Benchmarks.").add_subparsers(dest="bench_command", required=True)
    from tessellm.entrypoints import bench_latency, bench_serve, bench_throughput

    bench_throughput.add_arguments(bench.add_parser("throughput", help="Offline throughput."))
    bench_latency.add_arguments(bench.add_parser("latency", help="Batch-1 TTFT and ms per token."))
    bench_serve.add_arguments(bench.add_parser("serve", help="Online serving latency and throughput."))
    return parser


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while a command starts (imports; serve: the engine's start,
        from tessellm.entrypoints.interrupt import ctrl_c_handled

        print("tessellm: interrupted.", file=sys.stderr)  # its core stopped on the way out)
        return ctrl_c_handled()  # 130, as a shell reports a Ctrl-C


def _main(argv=None) -> int:
    from tessellm.entrypoints.vllm_args import expand_argv

    parser = build_parser()
    argv = expand_argv(list(sys.argv[1:] if argv is None else argv), parser)  # vLLM's --config, --a_b
    _prestart_engine_forkserver(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from tessellm import envs
    from tessellm.backends.plugin_checks import PluginError

    try:
        return _dispatch(args) or 0
    except (ValueError, FileNotFoundError, PluginError) as exc:
        if envs.debug():  # TESSELLM_DEBUG=1: the whole traceback
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _prestart_engine_forkserver(argv: list) -> None:
    """``serve``: the engine core is forked from a forkserver that imports torch and tessellm
    (distributed/spawn.py); started first thing, its imports run beside this process's own
    (a server ready ~3 s sooner on 2 cores)."""
    command = next((a for a, before in zip(argv, [None, *argv])
                    if not a.startswith("-") and before != "--log-level"), None)
    if command != "serve" or {"-h", "--help", "--ray"} & set(argv):  # --ray: engines on Ray
        return
    from tessellm import envs
    from tessellm.distributed.spawn import prestart

    prestart(envs.engine_process_env_defaults())  # as EngineCoreClient sets them


def _dispatch(args) -> int:
    if args.command == "serve":
        from tessellm.entrypoints.serve import run_serve

        return run_serve(args)
    if args.command == "generate":
        from tessellm.entrypoints.serve import run_generate

        return run_generate(args)
    if args.command == "backends":
        from tessellm.backends.report import describe_backends

        print(describe_backends(args.verbose))
        return 0
    if args.bench_command == "throughput":
        from tessellm.entrypoints.bench_throughput import run

        return run(args)
    if args.bench_command == "latency":
        from tessellm.entrypoints.bench_latency import run

        return run(args)
    from tessellm.entrypoints.bench_serve import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
