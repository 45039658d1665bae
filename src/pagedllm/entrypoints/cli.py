"""The `pagedllm` command: serve, generate, chat, bench."""

from __future__ import annotations

import argparse
import logging
import sys

from pagedllm.config import EngineArgs


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampled request")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace):
    from pagedllm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop)


def _cmd_generate(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.llm import LLM

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    prompts = args.prompt or [sys.stdin.read()]
    outputs = llm.generate(prompts, _sampling_params(args), use_tqdm=False)
    for output in outputs:
        if len(outputs) > 1:
            print(f"### {output.prompt!r}")
        print(output.prompt + output.outputs[0].text if args.echo else output.outputs[0].text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.chat_repl import run_chat

    return run_chat(EngineArgs.from_cli_args(args), _sampling_params(args), args.system)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server
    from pagedllm.entrypoints.openai.cli_args import resolve_model_arg

    resolve_model_arg(args)
    return run_server(args)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from pagedllm.benchmarks.serve import run_serve_benchmark_cli

    return run_serve_benchmark_cli(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pagedllm.benchmarks.throughput import run_throughput_cli

    return run_throughput_cli(args)


def _cmd_bench_latency(args: argparse.Namespace) -> int:
    from pagedllm.benchmarks.latency import run_latency_cli

    return run_latency_cli(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="pagedllm", description="LLM inference on a paged KV cache.")
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default: INFO for serve, WARNING otherwise")
    sub = parser.add_subparsers(dest="command", required=True)

    from pagedllm.entrypoints.openai.cli_args import add_serve_args

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default: embedded SmolLM2-135M-Instruct)")
    add_serve_args(serve)
    serve.set_defaults(func=_cmd_serve, default_log_level="INFO")

    gen = sub.add_parser("generate", help="complete prompts (default model: embedded SmolLM2-135M-Instruct)")
    gen.add_argument("prompt", nargs="*", help="prompt text (read from stdin when omitted)")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    EngineArgs.add_cli_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, streaming the answer")
    chat.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=_cmd_chat, max_tokens=512)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from pagedllm.benchmarks.throughput import add_throughput_args

    throughput = bench_sub.add_parser("throughput", help="offline throughput (workloads C1 / T1)")
    add_throughput_args(throughput)
    EngineArgs.add_cli_args(throughput)
    throughput.set_defaults(func=_cmd_bench)

    from pagedllm.benchmarks.latency import add_latency_args

    latency = bench_sub.add_parser("latency", help="single-stream latency: TTFT and time per output token (L1)")
    add_latency_args(latency)
    EngineArgs.add_cli_args(latency)
    latency.set_defaults(func=_cmd_bench_latency)

    from pagedllm.benchmarks.serve import add_serve_benchmark_args

    serve_bench = bench_sub.add_parser("serve", help="online serving load generator (workload S1)")
    add_serve_benchmark_args(serve_bench)
    serve_bench.set_defaults(func=_cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pagedllm` command."""
    args = build_parser().parse_args(argv)
    log_level = args.log_level or getattr(args, "default_log_level", "WARNING")
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
