"""GGUF files of Qwen2, Phi-3, Gemma 2 and Gemma 3, written from tiny HF models as llama.cpp's converter
writes them: the config equals the HF config, the weights equal transformers' own GGUF load (and the
HF model's), and pagedllm's greedy tokens from the .gguf equal HF generate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from pagedllm.layers.rotary import rope_parameters
from pagedllm.loader.gguf_loader import iter_gguf_weights, load_gguf_config
from pagedllm.models.gemma import gemma3_rope_parameters
from pagedllm.models.sliding_window import layer_sliding_windows
from tests.loader.gguf_writer import write_gguf
from tests.models.test_phi3_mixtral import CONFIGS as PHI3_MIXTRAL_CONFIGS
from tests.models.tiny_models import (
    SLIDING_WINDOW,
    SLIDING_WINDOW_CONFIGS,
    TINY_CONFIGS,
    build_tiny_model,
    engine_greedy,
    hf_greedy,
    random_prompts,
)

MAX_NEW_TOKENS = 8
# Shorter than, and (30 tokens) well past, the tiny models' 12-token window.
PROMPTS = random_prompts([1, 5, 30], seed=3)

# The model tests' tiny configs. Gemma's change where GGUF cannot say otherwise: llama.cpp derives the
# attention scale from head_dim (query_pre_attn_scalar) and fixes Gemma 3's 5:1 local/global layer
# pattern (so 6 layers, one of them global). Phi-3 gets a window, which GGUF does store.
CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen2ForCausalLM": TINY_CONFIGS["Qwen2ForCausalLM"],
    "Phi3ForCausalLM": {**PHI3_MIXTRAL_CONFIGS["Phi3ForCausalLM"], "sliding_window": SLIDING_WINDOW},
    "Gemma2ForCausalLM": {**SLIDING_WINDOW_CONFIGS["Gemma2ForCausalLM"], "query_pre_attn_scalar": 16},
    "Gemma3ForCausalLM": {**SLIDING_WINDOW_CONFIGS["Gemma3ForCausalLM"], "query_pre_attn_scalar": 16,
                          "num_hidden_layers": 6, "sliding_window_pattern": 6},
}
# One architecture stored quantized, as most published GGUF files are; the others F32.
QUANTIZED = {"Phi3ForCausalLM": GGMLQuantizationType.Q8_0}
# Config keys each architecture's model reads beyond the shared ones, checked against the HF config.
EXTRA_KEYS = {
    "Qwen2ForCausalLM": [],
    "Phi3ForCausalLM": ["partial_rotary_factor"],
    "Gemma2ForCausalLM": ["query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                          "hidden_activation"],
    "Gemma3ForCausalLM": ["query_pre_attn_scalar", "final_logit_softcapping", "hidden_activation"],
}
SHARED_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
               "eos_token_id"]


class Tiny:
    """A tiny HF model, its .gguf, transformers' GGUF load of it, and the HF greedy tokens to match."""

    def __init__(self, architecture: str, folder: str) -> None:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        self.architecture = architecture
        self.quant = QUANTIZED.get(architecture, GGMLQuantizationType.F32)
        self.hf_model = build_tiny_model(architecture, folder, configs=CONFIGS,
                                         perturb_norms=architecture.startswith("Gemma"))
        self.path = f"{folder}/model-{self.quant.name}.gguf"
        write_gguf(self.hf_model, self.path, self.quant)
        # transformers' GGUF loader maps names through the model it is given (only its names are used).
        self.transformers_weights: dict[str, torch.Tensor] = load_gguf_checkpoint(
            self.path, return_tensors=True, model_to_load=self.hf_model)["tensors"]
        oracle = self.hf_model
        if self.quant != GGMLQuantizationType.F32:
            # The file holds quantized weights: the oracle is the HF model with them.
            oracle = copy.deepcopy(self.hf_model)
            missing, unexpected = oracle.load_state_dict(self.transformers_weights, strict=False)
            assert set(missing) <= {"lm_head.weight"} and not unexpected  # only a tied head is absent
        self.expected_tokens = hf_greedy(oracle, PROMPTS, MAX_NEW_TOKENS)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return Tiny(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_config_equals_the_hf_config(tiny: Tiny) -> None:
    ours, hf = load_gguf_config(tiny.path), tiny.hf_model.config
    assert ours["architectures"] == [tiny.architecture]
    for key in SHARED_KEYS + EXTRA_KEYS[tiny.architecture]:
        expected = getattr(hf, key)
        # GGUF stores floats as float32 (rms_norm_eps 1e-6 reads back as 9.99999997e-07, as in transformers).
        assert ours[key] == (float(np.float32(expected)) if isinstance(expected, float) else expected), key
    assert ours["head_dim"] == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    # What the models derive from the config: each layer's window and RoPE.
    layer_types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers  # Phi-3: all
    hf_windows = [hf.sliding_window if t == "sliding_attention" else None for t in layer_types]
    assert layer_sliding_windows(ours) == hf_windows
    if tiny.architecture == "Gemma3ForCausalLM":
        for sliding, layer_type in ((True, "sliding_attention"), (False, "full_attention")):
            assert _rope(gemma3_rope_parameters(ours, sliding)) == _rope(hf.rope_parameters[layer_type])
    else:
        assert _rope(ours) == _rope(hf.rope_parameters)


def _rope(params: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings the rotary embedding uses, from a config or a rope_parameters dict."""
    params = rope_parameters({"rope_parameters": params} if "rope_type" in params else params)
    return {key: params.get(key) for key in ("rope_type", "rope_theta", "factor")}


def test_weights_equal_transformers_gguf_load(tiny: Tiny) -> None:
    ours = dict(iter_gguf_weights(tiny.path, load_gguf_config(tiny.path)))
    assert set(ours) == set(tiny.transformers_weights)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, tiny.transformers_weights[name]), name


def test_weights_equal_the_hf_model(tiny: Tiny) -> None:
    hf = tiny.hf_model.state_dict()
    ours = dict(iter_gguf_weights(tiny.path, load_gguf_config(tiny.path)))
    # Tied embeddings: no output tensor in the file, the engine ties lm_head itself.
    assert set(ours) == set(hf) - ({"lm_head.weight"} if tiny.hf_model.config.tie_word_embeddings else set())
    for name, tensor in ours.items():
        if tiny.quant != GGMLQuantizationType.F32:
            torch.testing.assert_close(tensor, hf[name], rtol=0, atol=2e-3)  # Q8_0: a step is max|w|/127
        elif tiny.architecture.startswith("Gemma") and name.endswith("norm.weight"):
            # Stored as 1 + w: w itself may lose its last bits, the 1 + w the model computes does not.
            assert torch.equal(1 + tensor, 1 + hf[name]), name
        else:
            assert torch.equal(tensor, hf[name]), name


def test_greedy_tokens_equal_hf_generate(tiny: Tiny) -> None:
    assert engine_greedy(tiny.path, PROMPTS, MAX_NEW_TOKENS, num_gpu_blocks_override=32) == tiny.expected_tokens


def _write_metadata_only(path: str, arch: str, **keys: Any) -> None:
    """A GGUF file with the shape keys `load_gguf_config` needs and no tensors."""
    writer = GGUFWriter(path, arch)
    writer.add_embedding_length(keys.pop("hidden", 64))
    writer.add_head_count(keys.pop("heads", 4))
    writer.add_feed_forward_length(128)
    writer.add_vocab_size(512)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Real shapes (arch, layers, hidden, heads, head_dim) -> the HF config's query_pre_attn_scalar:
# Gemma 2 2B and 27B, Gemma 3 4B and 27B.
@pytest.mark.parametrize(("shape", "expected"), [
    (("gemma2", 26, 2304, 8, 256), 256), (("gemma2", 46, 4608, 32, 128), 144),
    (("gemma3", 34, 2560, 8, 256), 256), (("gemma3", 62, 5376, 32, 128), 168),
])
def test_gemma_attention_scale_follows_llama_cpp(tmp_path: Path, shape: tuple[Any, ...], expected: int) -> None:
    arch, layers, hidden, heads, head_dim = shape
    path = str(tmp_path / "gemma.gguf")
    _write_metadata_only(path, arch, hidden=hidden, heads=heads, block_count=layers, key_length=head_dim)
    config = load_gguf_config(path)
    assert config["query_pre_attn_scalar"] == expected
    # A Gemma 2 file without the keys gets llama.cpp's defaults; a Gemma 3 one without a window has none.
    assert config["sliding_window"] == (4096 if arch == "gemma2" else None)
    assert config["final_logit_softcapping"] == (30.0 if arch == "gemma2" else None)


def test_phi3_longrope_factors_become_the_rope_scaling(tmp_path: Path) -> None:
    from pagedllm.models.phi3 import Phi3ForCausalLM

    long, short = [1.0, 1.5, 2.0, 4.0], [1.0, 1.0, 1.25, 1.5]  # rotary dim 8 -> 4 factors
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long, "short_factor": short,
            "original_max_position_embeddings": 128, "partial_rotary_factor": 0.5}
    configs = {"Phi3ForCausalLM": {**CONFIGS["Phi3ForCausalLM"], "rope_parameters": rope,
                                   "original_max_position_embeddings": 128}}
    hf_model = build_tiny_model("Phi3ForCausalLM", str(tmp_path), configs=configs)
    path = str(tmp_path / "phi3.gguf")
    write_gguf(hf_model, path)
    config = load_gguf_config(path)
    assert config["rope_scaling"] == {"rope_type": "longrope", "type": "longrope", "long_factor": long,
                                      "short_factor": short, "original_max_position_embeddings": 128}
    assert {name for name, _ in iter_gguf_weights(path, config)} == set(hf_model.state_dict())
    # The engine has no LongRoPE: the model refuses the file instead of running it unscaled.
    with pytest.raises(ValueError, match="longrope"):
        Phi3ForCausalLM(config)


def test_llama3_rope_factors_are_read_from_rope_freqs(tmp_path: Path) -> None:
    # llama.cpp stores Llama 3.1+'s llama3 RoPE scaling as a rope_freqs tensor of per-frequency
    # divisors, with no scaling metadata; the loader must apply them. (Qwen2 naming: no Q/K permutation.)
    llama3 = TINY_CONFIGS["LlamaForCausalLM"]
    configs = {"Qwen2ForCausalLM": {**TINY_CONFIGS["Qwen2ForCausalLM"], "rope_scaling": llama3["rope_scaling"],
                                    "rope_theta": llama3["rope_theta"]}}
    hf_model = build_tiny_model("Qwen2ForCausalLM", str(tmp_path), configs=configs)
    path = str(tmp_path / "llama3-rope.gguf")
    write_gguf(hf_model, path)
    factors = load_gguf_config(path)["rope_scaling"]["inv_freq_factors"]
    assert factors[0] == 1.0 and factors[-1] == llama3["rope_scaling"]["factor"]  # high kept, low slowed
    prompts = random_prompts([20, 45], seed=4)
    assert engine_greedy(path, prompts, 12, num_gpu_blocks_override=32) == hf_greedy(hf_model, prompts, 12)
