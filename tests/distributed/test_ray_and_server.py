"""Tensor and pipeline parallelism through a Ray cluster started by the test, and through the
OpenAI server (mp executor): TP=2 and PP=2 answers equal one rank's; a killed worker is reported
with its rank and turns the server's /health to 503 within seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.abstract import WorkerDiedError
from tests.distributed.test_tensor_parallel import kill_once_running
from tests.entrypoints.openai.conftest import MODEL_NAME, spawned_children, start_server, stop_server
from tests.entrypoints.openai.test_lifecycle import _exit_code, _start_streams
from tests.models.tiny_models import build_tiny_model, random_prompts, save_tiny_tokenizer

PROMPTS = random_prompts([1, 7, 16, 17, 30], seed=5)
ENGINE_ARGS = dict(skip_tokenizer_init=True, enforce_eager=True, num_gpu_blocks_override=64, max_model_len=128)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A tiny Llama with a trained BPE tokenizer."""
    path = str(tmp_path_factory.mktemp("tp-llama"))
    build_tiny_model("LlamaForCausalLM", path)
    save_tiny_tokenizer(path)
    return path


def _greedy_ids(path: str, max_tokens: int = 12, **engine_args) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(path, **{**ENGINE_ARGS, **engine_args}) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster started with `ray start --head`; the engine joins it via RAY_ADDRESS."""
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.skip("the ray package is not installed")
    import ray

    from pagedllm.executor.multiproc import get_open_port

    port = get_open_port()
    subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--num-cpus", "4", "--include-dashboard",
                    "false", "--disable-usage-stats"], check=True, capture_output=True, timeout=120)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        yield os.environ["RAY_ADDRESS"]
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def test_ray_tp2_gives_tp1_tokens(ray_cluster, llama_dir):
    assert _greedy_ids(llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray") == _greedy_ids(llama_dir)


def test_ray_pp2_gives_pp1_tokens(ray_cluster, llama_dir):
    # Ray actors as pipeline stages: the engine reads the last stage's answer; with async
    # scheduling and micro-batches, as on GPUs by default.
    assert (_greedy_ids(llama_dir, pipeline_parallel_size=2, distributed_executor_backend="ray", async_scheduling=True)
            == _greedy_ids(llama_dir))


def test_killed_ray_worker_is_reported_with_its_rank(ray_cluster, llama_dir):
    llm = LLM(llama_dir, **ENGINE_ARGS, tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        killer = kill_once_running(llm.llm_engine.engine_core.executor.worker_pids()[1], llm)
        params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        with pytest.raises(WorkerDiedError, match="rank 1"):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        killer.join(timeout=10)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("parallel_flag", ["--tensor-parallel-size", "--pipeline-parallel-size"])
def test_server_tp2_answers_like_tp1_and_reports_a_dead_worker(llama_dir, parallel_flag):
    prompts = ["The quick brown fox", "Paged attention stores", "Tensor"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with LLM(llama_dir, enforce_eager=True, num_gpu_blocks_override=64, max_model_len=128) as llm:
        expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    # PP with async scheduling (the GPU default): each request alone decodes ahead.
    extra = ["--async-scheduling"] if parallel_flag == "--pipeline-parallel-size" else []
    server = start_server(["--model", llama_dir, "--max-model-len", "128", "--num-gpu-blocks-override", "64",
                           "--enforce-eager", parallel_flag, "2", *extra])
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for prompt, text in zip(prompts, expected):
                body = {"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "ignore_eos": True}
                response = client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["text"] == text
            (engine_core,) = spawned_children(server.proc.pid)
            workers = spawned_children(engine_core)
            assert len(workers) == 2
            os.kill(workers[1], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while client.get("/health").status_code == 200:
                assert time.monotonic() < deadline, "/health still 200 30 s after a worker died"
                time.sleep(0.2)
            assert client.get("/health").status_code == 503
        assert "rank 1" in server.log()
    finally:
        stop_server(server)


def test_server_tp2_drains_on_a_sigterm_to_the_whole_process_group(llama_dir):
    # systemd and `timeout` signal every process of the group: the TP workers and the engine core
    # must keep serving while the server drains the streams in flight, then all exit.
    server = start_server(["--model", llama_dir, "--max-model-len", "512", "--num-gpu-blocks-override", "64",
                           "--enforce-eager", "--tensor-parallel-size", "2", "--served-model-name", MODEL_NAME,
                           "--shutdown-timeout", "120"], new_session=True)
    try:
        (engine_core,) = spawned_children(server.proc.pid)
        workers = spawned_children(engine_core)
        max_tokens = 200
        threads, events = _start_streams(server, 2, max_tokens)
        os.killpg(server.proc.pid, signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        for stream in events:
            assert stream[-1] == "[DONE]" and not any('"error"' in event for event in stream)
            assert json.loads(stream[-2])["usage"]["completion_tokens"] == max_tokens
        assert _exit_code(server) == 0
        deadline = time.monotonic() + 30
        while any(os.path.exists(f"/proc/{pid}") for pid in workers):
            assert time.monotonic() < deadline, "TP workers outlived the server"
            time.sleep(0.1)
    finally:
        stop_server(server)
