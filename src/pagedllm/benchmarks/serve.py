"""Online serving benchmark (workload S1): an asyncio + HTTP streaming load generator for `pagedllm serve`.

`pagedllm bench serve --num-prompts 500 --input-len 1024 --output-len 128 --request-rates 4,16,inf`
sends random-token prompts to /v1/completions (streaming, `ignore_eos`) at each request rate
(Poisson arrivals; `inf` sends everything at once) and reports request throughput, output tok/s,
TTFT and inter-token latency p50/p99, and errors. `--launch-server` starts the server itself with
`--server-args`; `--compare-offline` also runs the offline engine (same engine flags, same
requests) in this process, alternating with saturation runs of the idle-in-between server, so both
numbers come from one run on the same machine state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any


def add_serve_benchmark_args(parser: argparse.ArgumentParser) -> None:
    """Workload, target and reporting flags of the serving benchmark."""
    parser.add_argument("--base-url", default=None, help="server to load (default: http://127.0.0.1:8000)")
    parser.add_argument("--launch-server", action="store_true", help="start `pagedllm serve --server-args ...` itself")
    parser.add_argument("--server-args", default="", help="engine/server flags for --launch-server and the offline run")
    parser.add_argument("--compare-offline", action="store_true",
                        help="also time the offline engine on the same requests, alternating with the server")
    parser.add_argument("--repeats", type=int, default=1, help="server/offline pairs for --compare-offline")
    parser.add_argument("--model", default=None, help="model name sent in requests (default: the server's first)")
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)]")
    parser.add_argument("--request-rates", default="inf", help="comma-separated requests/s, e.g. 4,16,inf")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--output-json", default=None)


@dataclass
class BenchRequest:
    """One request of the workload: prompt token ids and how many tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int


@dataclass
class RequestResult:
    """What the client saw of one request."""

    success: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)


def make_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                  seed: int) -> list[BenchRequest]:
    """Random-token prompts with (optionally) random lengths, reproducible from `seed`."""
    rng = random.Random(seed)

    def length(mean: int) -> int:
        low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.randint(low, high)

    requests = []
    for _ in range(num_prompts):
        prompt_len, out_len = length(input_len), length(output_len)
        requests.append(BenchRequest([rng.randint(100, 9999) for _ in range(prompt_len)], out_len))
    return requests


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def _send(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> RequestResult:
    """Stream one completion; time its first token and every later chunk."""
    result = RequestResult()
    start = time.perf_counter()
    last = start
    finished = False
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    finished = finished or choice.get("finish_reason") is not None
    except Exception as e:  # a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.success = finished and not result.error
    if not finished:
        result.error = "the stream ended without a finish_reason"
    return result


async def run_load(base_url: str, model: str, requests: list[BenchRequest], request_rate: float,
                   temperature: float, seed: int, api_key: str | None) -> dict[str, Any]:
    """Send every request at `request_rate` (Poisson; inf = all at once) and summarise the results."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url}/v1/completions"
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for request in requests:
            body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.output_len,
                    "temperature": temperature, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(_send(client, url, body, headers)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results: list[RequestResult] = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ok = [r for r in results if r.success]
    itls = [x for r in ok for x in r.itls]
    ttfts = [r.ttft for r in ok]
    output_tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.success]
    return {
        "request_rate": "inf" if request_rate == float("inf") else request_rate,
        "completed": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
        "duration_s": duration, "request_throughput": len(ok) / duration, "output_tok_s": output_tokens / duration,
        "output_tokens": output_tokens,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(itls, 50), "itl_p99_ms": 1000 * percentile(itls, 99),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(server_args: str, port: int, timeout: float = 300.0) -> subprocess.Popen:
    """Start `pagedllm serve` on `port` and wait for /ready; raises RuntimeError if it does not come up."""
    import httpx

    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *shlex.split(server_args),
           "--port", str(port), "--disable-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"The server exited during start-up (exit code {proc.returncode}): {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"The server did not become ready within {timeout} s.")


def make_offline_engine(server_args: str) -> Any:
    """The offline engine with the server's engine flags, warmed up."""
    from pagedllm.config import EngineArgs
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.entrypoints.openai.cli_args import add_serve_args, resolve_model_arg
    from pagedllm.sampling_params import SamplingParams

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    ns = parser.parse_args(shlex.split(server_args))
    resolve_model_arg(ns)
    llm = LLM(**vars(EngineArgs.from_cli_args(ns)))
    llm.generate([[100, 101, 102]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    return llm


def run_offline(llm: Any, requests: list[BenchRequest], temperature: float) -> dict[str, Any]:
    """Output tok/s of the offline engine on the same requests."""
    from pagedllm.sampling_params import SamplingParams

    params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"duration_s": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "request_throughput": len(requests) / elapsed}


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['request_rate']:>6} {r['request_throughput']:>7.2f} {r['output_tok_s']:>10.1f} "
              f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms {r['itl_p50_ms']:>6.0f}ms "
              f"{r['itl_p99_ms']:>6.0f}ms {r['errors']:>6}")


def run_serve_benchmark_cli(args: argparse.Namespace) -> int:
    """Run the load at every request rate (and the offline baseline), print a table, write JSON.

    With --compare-offline, saturation runs of the server (rate inf) and offline runs alternate
    --repeats times while the other side idles, so both see the same machine; the best of each
    and the ratio of every pair are reported (shared CPU machines drift by several times).
    """
    import httpx

    rates = [float(r) for r in args.request_rates.split(",")]
    requests = make_requests(args.num_prompts, args.input_len, args.output_len, args.random_range_ratio, args.seed)
    proc = None
    base_url = args.base_url or "http://127.0.0.1:8000"
    if args.launch_server:
        port = _free_port()
        proc = launch_server(args.server_args, port)
        base_url = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                            "random_range_ratio": args.random_range_ratio, "server_args": args.server_args,
                            "rows": rows}
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(f"{base_url}/v1/models", headers=headers).json()["data"][0]["id"]

        def load(rate: float, reqs: list[BenchRequest]) -> dict[str, Any]:
            return asyncio.run(run_load(base_url, model, reqs, rate, args.temperature, args.seed, args.api_key))

        load(float("inf"), requests[:1])  # warm-up: a fresh engine's first steps are slow
        for rate in rates:
            rows.append(load(rate, requests))
        if args.compare_offline:
            llm = make_offline_engine(args.server_args)
            pairs = []
            for _ in range(args.repeats):
                offline = run_offline(llm, requests, args.temperature)
                server = load(float("inf"), requests)
                pairs.append({"server_output_tok_s": server["output_tok_s"], "server_errors": server["errors"],
                              "offline_output_tok_s": offline["output_tok_s"],
                              "ratio": server["output_tok_s"] / offline["output_tok_s"]})
            info["offline_comparison"] = pairs
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    _print_table(rows)
    errors = sum(r["errors"] for r in rows)
    if "offline_comparison" in info:
        pairs = info["offline_comparison"]
        errors += sum(p["server_errors"] for p in pairs)
        best_server = max(p["server_output_tok_s"] for p in pairs)
        best_offline = max(p["offline_output_tok_s"] for p in pairs)
        info["server_over_offline_best"] = best_server / best_offline
        ratios = ", ".join(f"{p['ratio']:.2f}" for p in pairs)
        print(f"saturation (rate inf), alternating runs: server best {best_server:.1f} output tok/s, offline best "
              f"{best_offline:.1f} ({100 * best_server / best_offline:.0f}%); per-pair ratios: {ratios}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(info, f, indent=2)
    return 0 if errors == 0 else 1
