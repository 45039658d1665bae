"""Pipeline parallelism on CPU over gloo: PP=2 (also with TP=2, and PP=3 over an uneven split)
gives PP=1's greedy tokens for every family, logprobs included; a dead stage fails loudly,
naming its rank."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.abstract import WorkerDiedError
from pagedllm.models.pipeline import stage_layer_range
from tests.distributed.test_tensor_parallel import (  # noqa: F401 - model_dirs is a fixture
    ENGINE_ARGS,
    MAX_TOKENS,
    PROMPTS,
    _greedy,
    kill_once_running,
    model_dirs,
)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MixtralForCausalLM"])
def test_pp2_mp_gives_pp1_tokens(model_dirs, arch):
    path = model_dirs[arch]
    assert _greedy(path, pipeline_parallel_size=2) == _greedy(path)


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM", "gpt2",
                                  "opt-pre-ln-proj", "SlidingMistral"])
def test_pp2_covers_every_family(model_dirs, arch):
    # Tied embeddings (Qwen2, GPT-2, OPT: the last stage loads the embedding into its own LM
    # head), MoE with dense layers, learned positions and OPT's projections on the first / last
    # stage, every layer sliding with blocks freed behind the window.
    path = model_dirs[arch]
    assert _greedy(path, pipeline_parallel_size=2) == _greedy(path)


def test_pp3_splits_unevenly(model_dirs):
    # Gemma 2's four layers over three stages: 2, 1, 1 (and its scaled embedding, tied LM head,
    # alternating windows).
    path = model_dirs["Gemma2ForCausalLM"]
    assert _greedy(path, pipeline_parallel_size=3) == _greedy(path)


def test_tp2_pp2(model_dirs):
    # Four ranks: each stage all-reduces within its own tensor-parallel group, the activations go
    # rank to rank between the stages, two micro-batches are in flight.
    path = model_dirs["Qwen3ForCausalLM"]
    assert _greedy(path, tensor_parallel_size=2, pipeline_parallel_size=2) == _greedy(path)


def test_pp2_one_step_at_a_time_gives_pp1_tokens(model_dirs):
    # --no-pipeline-micro-batching: the plain path, the oracle of the micro-batched one.
    path = model_dirs["LlamaForCausalLM"]
    assert _greedy(path, pipeline_parallel_size=2, pipeline_micro_batching=False) == _greedy(path)


@pytest.mark.parametrize("micro_batching", [True, False])
def test_pp2_async_scheduling_gives_pp1_tokens(model_dirs, micro_batching):
    # Async scheduling (the default on GPUs) with and without micro-batches: decodes ahead get
    # their input from the last stage; preemption and chunked prefill in between.
    path = model_dirs["LlamaForCausalLM"]
    assert _greedy(path, pipeline_parallel_size=2, async_scheduling=True,
                   pipeline_micro_batching=micro_batching) == _greedy(path)


def _lone_request_decodes_ahead(path: str, **engine_args) -> tuple[list[int], int]:
    """One request's greedy tokens, and how many of its steps decoded ahead of a pending token."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(path, **ENGINE_ARGS, **engine_args) as llm:
        scheduler = llm.llm_engine.engine_core.scheduler
        schedule, ahead = scheduler.schedule, []

        def counting_schedule():
            out = schedule()
            ahead.extend(out.decode_ahead_req_ids)
            return out

        scheduler.schedule = counting_schedule
        (out,) = llm.generate([{"prompt_token_ids": PROMPTS[4]}], params, use_tqdm=False)
    return out.outputs[0].token_ids, len(ahead)


@pytest.mark.parametrize(("arch", "layout"), [("LlamaForCausalLM", (1, 2)), ("Gemma2ForCausalLM", (1, 3)),
                                               ("Qwen3ForCausalLM", (2, 2))])
def test_a_lone_request_decodes_ahead_with_async_scheduling(model_dirs, arch, layout):
    # A single request cannot be split into micro-batches: every step after the first decodes
    # ahead, its input sent from the last stage to the first (a middle stage needs none; with
    # TP each rank of the first stage gets it from its peer of the last).
    tp, pp = layout
    path = model_dirs[arch]
    tokens, num_ahead = _lone_request_decodes_ahead(path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                                    async_scheduling=True)
    assert num_ahead >= MAX_TOKENS // 2
    assert tokens == _lone_request_decodes_ahead(path)[0]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_pp2_logprobs_and_seeded_sampling_match_pp1(model_dirs, async_scheduling):
    # The engine reads the last stage's output: logprobs, prompt logprobs and the seeded draws
    # are all made there (with async scheduling, also while the next step decodes ahead).
    path = model_dirs["LlamaForCausalLM"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=7)
    results = []
    for pp in (1, 2):
        with LLM(path, **{**ENGINE_ARGS, "num_gpu_blocks_override": 64}, pipeline_parallel_size=pp,
                 async_scheduling=async_scheduling) as llm:
            prompts = [{"prompt_token_ids": p} for p in PROMPTS[1:4]]
            a = llm.generate(prompts, greedy, use_tqdm=False)
            b = llm.generate(prompts, seeded, use_tqdm=False)
        results.append((
            [(o.outputs[0].token_ids, [{t: round(lp.logprob, 4) for t, lp in step.items()} for step in o.outputs[0].logprobs],
              [None if step is None else {t: round(lp.logprob, 4) for t, lp in step.items()} for step in o.prompt_logprobs])
             for o in a],
            [o.outputs[0].token_ids for o in b]))
    assert results[0] == results[1]
    assert len(results[1][0][0][1]) == 6 and len(results[1][0][0][2]) == len(PROMPTS[1])


def test_killed_stage_fails_the_engine_naming_its_rank(model_dirs):
    llm = LLM(model_dirs["LlamaForCausalLM"], skip_tokenizer_init=True, enforce_eager=True, pipeline_parallel_size=2,
              num_gpu_blocks_override=64)
    try:
        executor = llm.llm_engine.engine_core.executor
        killer = kill_once_running(executor.processes[0].pid, llm)  # the first stage
        params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        with pytest.raises(WorkerDiedError, match="rank 0"):
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        killer.join(timeout=10)
        assert not any(p.is_alive() for p in executor.processes)
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("layers", "stages", "ranges"), [
    (4, 2, [(0, 2), (2, 4)]),
    (4, 3, [(0, 2), (2, 3), (3, 4)]),
    (80, 3, [(0, 27), (27, 54), (54, 80)]),
    (2, 2, [(0, 1), (1, 2)]),
])
def test_stage_layer_ranges_cover_every_layer_once(layers, stages, ranges):
    assert [stage_layer_range(layers, rank, stages) for rank in range(stages)] == ranges


def test_pipeline_parallel_size_is_checked():
    with pytest.raises(ValueError, match="cannot be split"):
        stage_layer_range(2, 0, 3)


def test_dummy_weights_stage_draws_only_its_layers(model_dirs):
    # Each stage draws only its own layers' random tensors (plus the embedding / LM head), each
    # from its name alone: PP=2 gives PP=1's tokens on dummy weights.
    path = model_dirs["Qwen2ForCausalLM"]  # tied embeddings: the last stage still draws the embedding
    assert _greedy(path, pipeline_parallel_size=2, load_format="dummy") == _greedy(path, load_format="dummy")


def test_only_decoder_layers_of_other_stages_are_skipped_by_the_dummy_draw(model_dirs):
    import json
    import os

    import torch

    from pagedllm.distributed import set_pipeline_parallel_state
    from pagedllm.loader.model_loader import build_model
    from pagedllm.models.pipeline import is_missing_parameter, is_other_stages_layer

    with open(os.path.join(model_dirs["Qwen2ForCausalLM"], "config.json")) as f:
        config = json.load(f)
    set_pipeline_parallel_state(1, 2)  # the last of two stages
    try:
        model = build_model(config, torch.float32, "meta")
    finally:
        set_pipeline_parallel_state(0, 1)
    assert is_other_stages_layer("model.layers.0.mlp.down_proj.weight", model)
    assert not is_other_stages_layer("model.layers.1.mlp.down_proj.weight", model)
    # The embedding is another stage's module, but the tied LM head here loads it.
    assert is_missing_parameter("model.embed_tokens.weight", model)
    assert not is_other_stages_layer("model.embed_tokens.weight", model)
    assert [layer.num_kv_heads for layer in model.attention_layers()] == [config["num_key_value_heads"]]


def test_ray_ranks_are_numbered_node_by_node():
    from pagedllm.executor.ray_executor import ranks_by_node, tensor_parallel_groups_span_nodes

    # Bundles placed alternately on two 2-GPU machines: ranks 0-1 on B, 2-3 on A.
    nodes = ["B", "A", "B", "A"]
    order = ranks_by_node(nodes)
    assert order == [0, 2, 1, 3]
    node_of_rank = [nodes[i] for i in order]
    assert not tensor_parallel_groups_span_nodes(node_of_rank, 2)  # -tp 2 -pp 2: one stage per machine
    assert tensor_parallel_groups_span_nodes(node_of_rank, 4)
    assert tensor_parallel_groups_span_nodes(["A", "A", "A", "B", "B", "B"], 2)  # 3 GPUs a node, TP=2
