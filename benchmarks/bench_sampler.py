"""Microbenchmark of the sampler: ms per forward for 256 rows at two vocabulary sizes.

Run: PYTHONPATH=src python benchmarks/bench_sampler.py [--rows 256] [--iters 5] [--device cpu]
     PYTHONPATH=src python benchmarks/bench_sampler.py --triton --device cuda [--rows 256]

     PYTHONPATH=src python benchmarks/bench_sampler.py --greedy --device cuda [--rows 256]

--triton compares only the temperature-only case (T = 0.6, vocab 151,936) on the PyTorch path
and on the fused Triton kernel (Sampler(use_triton=True)). With --device cpu it runs the kernel
in the Triton interpreter, which is only a smoke test: use a few rows.

--greedy compares greedy argmax at 1 x 128,256 (batch-1 decode, Llama-3.1-8B vocabulary) and
--rows x 151,936, bf16 and fp32 logits: torch.argmax, sample_greedy (nan_to_num_ + argmax, the
PyTorch path on CUDA) and the Triton greedy_sample. On CUDA each is timed per call inside a CUDA
graph of 10 calls (GPU time, launch overhead excluded) and eagerly with a sync per call.

Logits are "LM-like" (Gaussian with std 4: a peaked distribution whose 0.95 nucleus holds tens
to hundreds of tokens), except the "flat" case (std 1), the worst case for top-p because its
nucleus holds most of the vocabulary. Metadata building is timed apart from the forward.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

import torch

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampler import Sampler
from pagedllm.worker.sampling_metadata import build_sampling_metadata


def greedy(i: int) -> SamplingParams:
    """Temperature 0."""
    return SamplingParams(temperature=0.0)


def random_top_p(i: int) -> SamplingParams:
    """The common chat setting."""
    return SamplingParams(temperature=0.8, top_p=0.95)


def random_plain(i: int) -> SamplingParams:
    """Temperature only: the race runs over the whole vocabulary."""
    return SamplingParams(temperature=0.8)


def mixed_with_penalties(i: int) -> SamplingParams:
    """Half greedy, half top-k/top-p; every row with repetition/frequency/presence penalties."""
    penalties = dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2)
    if i % 2 == 0:
        return SamplingParams(temperature=0.0, **penalties)
    return SamplingParams(temperature=0.7, top_k=50, top_p=0.9, **penalties)


CASES: list[tuple[str, Callable[[int], SamplingParams], float]] = [
    ("all greedy", greedy, 4.0),
    ("all random top-p", random_top_p, 4.0),
    ("all random top-p (flat logits)", random_top_p, 1.0),
    ("all random, temperature only", random_plain, 4.0),
    ("mixed with penalties", mixed_with_penalties, 4.0),
]


def bench(rows: int, vocab_size: int, iters: int, device: torch.device) -> None:
    """Print build and forward ms for every case at one vocabulary size."""
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab_size) for _ in range(512)] for _ in range(rows)]
    outputs = [[rng.randrange(vocab_size) for _ in range(128)] for _ in range(rows)]
    sampler = Sampler()
    buffer = torch.empty(rows, vocab_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, make, scale in CASES:
        source = (torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(1)) * scale).to(device)
        params = [make(i) for i in range(rows)]
        build_s = forward_s = 0.0
        for it in range(iters + 1):  # the first iteration warms up
            t0 = time.perf_counter()
            md = build_sampling_metadata(params, prompts, outputs, [None] * rows, vocab_size, device)
            sync()
            t1 = time.perf_counter()
            buffer.copy_(source)  # the forward overwrites its logits
            sync()
            t2 = time.perf_counter()
            sampler.forward(buffer, md).sampled_token_ids.tolist()  # as the runner does
            t3 = time.perf_counter()
            if it:
                build_s += t1 - t0
                forward_s += t3 - t2
        print(
            f"vocab {vocab_size:6d}  {name:32s} build {build_s / iters * 1e3:7.2f} ms"
            f"   forward {forward_s / iters * 1e3:8.1f} ms"
        )


def bench_triton(rows: int, iters: int, device: torch.device, vocab_size: int = 151936) -> None:
    """Print forward ms of the PyTorch and Triton paths on temperature-0.6 rows, and the kernel's."""
    from pagedllm.worker.triton_sampling import gumbel_max_sample

    params = [SamplingParams(temperature=0.6) for _ in range(rows)]
    md = build_sampling_metadata(params, [[]] * rows, [[]] * rows, [None] * rows, vocab_size, device)
    source = (torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(1)) * 4.0).to(device)
    buffer = torch.empty_like(source)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step: Callable[[], object]) -> float:
        """Mean seconds of `step` over iters runs after one warm-up (compiles the kernels)."""
        total = 0.0
        for it in range(iters + 1):
            buffer.copy_(source)  # the torch path overwrites its logits
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if it:
                total += time.perf_counter() - t0
        return total / iters

    def enqueued(step: Callable[[], object]) -> float:
        """Mean host seconds to enqueue `step` (no sync inside the loop)."""
        step()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        seconds = time.perf_counter() - t0
        sync()
        return seconds / iters

    bf16 = source.to(torch.bfloat16)
    fused = Sampler(use_triton=True)
    shrinking = iter(range(rows, 0, -1))

    def shrinking_batch() -> object:
        """A batch one row smaller each call, as when requests finish (no recompiles allowed)."""
        n = next(shrinking)
        md_n = build_sampling_metadata(params[:n], [[]] * n, [[]] * n, [None] * n, vocab_size, device)
        return fused.forward(bf16[:n], md_n)

    results = {
        "torch  Sampler.forward": timed(lambda: Sampler(use_triton=False).forward(buffer, md)),
        "triton Sampler.forward": timed(lambda: Sampler(use_triton=True).forward(buffer, md)),
        "triton kernel alone": timed(lambda: gumbel_max_sample(buffer, md.temperature, 1234)),
        "triton forward, bf16 logits": timed(lambda: fused.forward(bf16, md)),
        "triton forward bf16, host enqueue only": enqueued(lambda: fused.forward(bf16, md)),
        "triton forward bf16, shrinking batch (host+GPU)": timed(shrinking_batch),
    }
    for name, seconds in results.items():
        print(f"{rows} x {vocab_size}  T=0.6  {name:48s} {seconds * 1e3:8.3f} ms")
    base = results["torch  Sampler.forward"]
    print(f"speedup of the forward: {base / results['triton Sampler.forward']:.1f}x")


def bench_greedy(rows: int, iters: int, device: torch.device) -> None:
    """Print us per call of torch argmax, sample_greedy and greedy_sample; check they agree."""
    from pagedllm.worker.sampler import sample_greedy
    from pagedllm.worker.triton_sampling import greedy_sample

    is_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    calls_per_graph = 10

    def eager_us(step: Callable[[], object]) -> float:
        """Mean us of `step` with a sync after each call, after one warm-up call."""
        step()
        sync()
        total = 0.0
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            sync()
            total += time.perf_counter() - t0
        return total / iters * 1e6

    def graph_us(step: Callable[[], object]) -> float:
        """Mean GPU us of `step` replayed from a CUDA graph of calls_per_graph calls."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles) off the capture
            step()
        torch.cuda.current_stream().wait_stream(side)
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls_per_graph):
                step()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replays = max(iters, 20)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        sync()
        return start.elapsed_time(end) * 1e3 / (replays * calls_per_graph)

    for n, vocab_size in ((1, 128256), (rows, 151936)):
        source = torch.randn(n, vocab_size, generator=torch.Generator().manual_seed(2)) * 4.0
        for dtype in (torch.bfloat16, torch.float32):
            logits = source.to(device=device, dtype=dtype)
            expected = sample_greedy(logits.clone())
            assert torch.equal(greedy_sample(logits), expected), "greedy_sample differs from sample_greedy"
            steps: dict[str, Callable[[], object]] = {
                "torch argmax": lambda: logits.argmax(-1),
                "torch sample_greedy (nan_to_num_ + argmax)": lambda: sample_greedy(logits),
                "triton greedy_sample": lambda: greedy_sample(logits),
            }
            for name, step in steps.items():
                graph = f"graph {graph_us(step):8.1f} us   " if is_cuda else ""
                print(f"greedy {n:4d} x {vocab_size}  {str(dtype)[6:]:8s}  {name:44s} {graph}"
                      f"eager {eager_us(step):8.1f} us")


def main() -> None:
    """Parse arguments and run every case at vocab 49152 and 151936 (or the --triton comparison)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--triton", action="store_true", help="compare the torch and fused Triton paths only")
    parser.add_argument("--greedy", action="store_true", help="compare torch argmax and the Triton greedy_sample")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} rows on {device}")
    if (args.triton or args.greedy) and device.type == "cpu":
        # Triton runs on CPU tensors only in its interpreter, chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.greedy:
        bench_greedy(args.rows, args.iters, device)
    if args.triton:
        bench_triton(args.rows, args.iters, device)
    if args.triton or args.greedy:
        return
    for vocab_size in (49152, 151936):
        bench(args.rows, vocab_size, args.iters, device)


if __name__ == "__main__":
    main()
