"""Online serving benchmark (workload S1): an asyncio + HTTP streaming load generator for `pagedllm serve`.

`pagedllm bench serve --num-prompts 500 --input-len 1024 --output-len 128 --request-rates 4,16,inf`
sends random-token prompts to /v1/completions (streaming, `ignore_eos`) at each request rate
(Poisson arrivals; `inf` sends everything at once) and reports request throughput, output tok/s,
TTFT and inter-token latency p50/p99, and errors. `--launch-server` starts the server itself with
`--server-args`; `--compare-offline` then also runs the offline engine (same engine flags, same
requests) after the server has stopped, so both numbers come from one run.
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
                        help="also time the offline engine on the same requests (after the server stopped)")
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
    output_tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.success]
    return {
        "request_rate": "inf" if request_rate == float("inf") else request_rate,
        "completed": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
        "duration_s": duration, "request_throughput": len(ok) / duration, "output_tok_s": output_tokens / duration,
        "output_tokens": output_tokens,
        "ttft_p50_ms": 1000 * percentile([r.ttft for r in ok], 50), "ttft_p99_ms": 1000 * percentile([r.ttft for r in ok], 99),
        "itl_p50_ms": 1000 * percentile(itls, 50), "itl_p99_ms": 1000 * percentile(itls, 99),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(server_args: str, port: int, timeout: float = 300.0) -> subprocess.Popen:
    """Start `pagedllm serve` on `port` and wait for /health; raises RuntimeError if it does not come up."""
    import httpx

    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", *shlex.split(server_args),
           "--port", str(port), "--disable-access-log"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"The server exited during start-up (exit code {proc.returncode}): {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"The server did not become healthy within {timeout} s.")


def run_offline(server_args: str, requests: list[BenchRequest], temperature: float) -> dict[str, Any]:
    """Output tok/s of the offline engine (same engine flags) on the same requests, after one warm-up."""
    from pagedllm.config import EngineArgs
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.entrypoints.openai.cli_args import add_serve_args, resolve_model_arg
    from pagedllm.sampling_params import SamplingParams

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    ns = parser.parse_args(shlex.split(server_args))
    resolve_model_arg(ns)
    llm = LLM(**vars(EngineArgs.from_cli_args(ns)))
    llm.generate([{"prompt_token_ids": requests[0].prompt_token_ids}], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"duration_s": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "request_throughput": len(requests) / elapsed}


def run_serve_benchmark_cli(args: argparse.Namespace) -> int:
    """Run the load at every request rate (and the offline baseline), print a table, write JSON."""
    import httpx

    rates = [float(r) for r in args.request_rates.split(",")]
    requests = make_requests(args.num_prompts, args.input_len, args.output_len, args.random_range_ratio, args.seed)
    proc = None
    base_url = args.base_url or "http://127.0.0.1:8000"
    if args.launch_server:
        port = _free_port()
        proc = launch_server(args.server_args, port)
        base_url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = args.model or httpx.get(f"{base_url}/v1/models", headers=headers).json()["data"][0]["id"]
        # Warm-up: the first steps of a fresh engine are slow (lazy initialisation).
        asyncio.run(run_load(base_url, model, requests[:1], float("inf"), args.temperature, args.seed, args.api_key))
        for rate in rates:
            rows.append(asyncio.run(run_load(base_url, model, requests, rate, args.temperature, args.seed,
                                             args.api_key)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    info: dict[str, Any] = {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                            "random_range_ratio": args.random_range_ratio, "server_args": args.server_args,
                            "rows": rows}
    if args.compare_offline:
        info["offline"] = run_offline(args.server_args, requests, args.temperature)
    print(f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['request_rate']:>6} {r['request_throughput']:>7.2f} {r['output_tok_s']:>10.1f} "
              f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms {r['itl_p50_ms']:>6.0f}ms "
              f"{r['itl_p99_ms']:>6.0f}ms {r['errors']:>6}")
    if "offline" in info:
        offline = info["offline"]["output_tok_s"]
        best = max(r["output_tok_s"] for r in rows)
        info["server_over_offline"] = best / offline
        print(f"offline engine: {offline:.1f} output tok/s; server at saturation: {best:.1f} "
              f"({100 * best / offline:.0f}% of offline)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(info, f, indent=2)
    return 0 if all(r["errors"] == 0 for r in rows) else 1
