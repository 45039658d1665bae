"""GGUF loading: config from metadata, weights under HF names, checked against transformers' own GGUF loader."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from pagedllm.loader.gguf_loader import (
    _unpermute_rows,
    dequantize_tensor,
    iter_gguf_weights,
    load_gguf_config,
    read_gguf,
)


def _default_model_or_skip() -> str:
    from pagedllm.config import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(f"embedded default model not installed: {exc}")


@pytest.fixture(scope="module")
def model_path() -> str:
    return _default_model_or_skip()


@pytest.fixture(scope="module")
def our_state_dict(model_path: str) -> dict[str, torch.Tensor]:
    return dict(iter_gguf_weights(model_path, load_gguf_config(model_path)))


@pytest.fixture(scope="module")
def oracle_model(model_path: str) -> torch.nn.Module:
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model (the oracle)")
    from transformers import AutoModelForCausalLM

    folder, filename = os.path.split(model_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)


def _write_gguf(path: str, arch: str, tensors: dict[str, np.ndarray],
                quant: GGMLQuantizationType = GGMLQuantizationType.F32) -> None:
    """A tiny GGUF file: hidden 32, 2 heads, 1 kv head, given tensors (2-D ones quantized to `quant`)."""
    writer = GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_vocab_size(32)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, array in tensors.items():
        if array.ndim == 2 and quant != GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf_quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_tensors(with_bias: bool, with_output: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (32, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.ffn_norm.weight": (32,), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
              "blk.0.attn_v.weight": (16, 32), "blk.0.attn_output.weight": (32, 32),
              "blk.0.ffn_gate.weight": (64, 32), "blk.0.ffn_up.weight": (64, 32), "blk.0.ffn_down.weight": (32, 64)}
    if with_bias:
        shapes.update({"blk.0.attn_q.bias": (32,), "blk.0.attn_k.bias": (16,), "blk.0.attn_v.bias": (16,)})
    if with_output:
        shapes["output.weight"] = (32, 32)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_config_describes_the_embedded_model(model_path: str) -> None:
    config = load_gguf_config(model_path)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["rope_theta"], config["max_position_embeddings"]) == (49152, 100000.0, 8192)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_config_agrees_with_transformers(model_path: str, oracle_model: torch.nn.Module) -> None:
    ours, theirs = load_gguf_config(model_path), oracle_model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "head_dim",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]


def test_state_dict_equals_transformers_tensor_by_tensor(
        our_state_dict: dict[str, torch.Tensor], oracle_model: torch.nn.Module) -> None:
    theirs = oracle_model.state_dict()
    # Tied embeddings: transformers lists lm_head.weight as the embedding itself; the GGUF has none.
    assert set(theirs) - set(our_state_dict) == {"lm_head.weight"}
    assert set(our_state_dict) <= set(theirs)
    for name, tensor in our_state_dict.items():
        assert tensor.dtype == torch.float32 and tensor.shape == theirs[name].shape, name
        assert torch.equal(tensor, theirs[name]), name


def test_reading_and_dequantizing_the_whole_model_is_fast(model_path: str) -> None:
    start = time.perf_counter()
    config = load_gguf_config(model_path)
    num_params = sum(t.numel() for _, t in iter_gguf_weights(model_path, config))
    elapsed = time.perf_counter() - start
    assert num_params > 130_000_000
    assert elapsed < 3.0, f"read + dequantize took {elapsed:.2f} s"


def test_metadata_parse_reads_tokenizer_arrays(model_path: str) -> None:
    meta = read_gguf(model_path).metadata
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][2] == "<|im_end|>"
    assert len(meta["tokenizer.ggml.merges"]) == len(set(meta["tokenizer.ggml.merges"]))
    assert meta["tokenizer.ggml.token_type"].dtype == np.int32


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's numpy code on non-finite random scales
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q2_K", "Q4_K", "Q6_K"])
def test_dequantization_is_bit_identical_to_gguf_package(qtype: str) -> None:
    from gguf import GGML_QUANT_SIZES

    ggml_type = GGMLQuantizationType[qtype]
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rows, cols = 6, 512
    # Random bytes cover every code, including non-finite scales, which must propagate alike.
    raw = np.random.default_rng(1).integers(0, 256, rows * cols // block_size * type_size, dtype=np.uint8)
    expected = torch.from_numpy(gguf_dequantize(raw.reshape(rows, -1), ggml_type).copy())
    actual = dequantize_tensor(torch.from_numpy(raw), ggml_type, (rows, cols))
    assert actual.dtype == torch.float32 and actual.shape == (rows, cols)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("num_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_rotary_permutation(num_heads: int) -> None:
    head_dim, cols = 8, 5
    hf_weight = torch.randn(num_heads * head_dim, cols)
    # llama.cpp's converter: interleave the two rotary halves of every head.
    gguf_weight = hf_weight.view(num_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape_as(hf_weight)
    assert torch.equal(gguf_weight[_unpermute_rows(num_heads * head_dim, num_heads)], hf_weight)


def test_qwen2_file_maps_to_qwen2_with_biases_and_unpermuted_weights(tmp_path: Path) -> None:
    tensors = _tiny_tensors(with_bias=True, with_output=True)
    path = str(tmp_path / "qwen2.gguf")
    _write_gguf(path, "qwen2", tensors)
    config = load_gguf_config(path)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["attention_bias"] is True
    assert config["tie_word_embeddings"] is False
    weights = dict(iter_gguf_weights(path, config))
    for hf_name, gguf_name in (("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
                               ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias"),
                               ("lm_head.weight", "output.weight")):
        assert torch.equal(weights[hf_name], torch.from_numpy(tensors[gguf_name])), hf_name


def test_llama_file_without_output_weight_has_tied_embeddings_and_no_lm_head(tmp_path: Path) -> None:
    path = str(tmp_path / "llama.gguf")
    _write_gguf(path, "llama", _tiny_tensors(with_bias=False, with_output=False), GGMLQuantizationType.Q8_0)
    config = load_gguf_config(path)
    names = {name for name, _ in iter_gguf_weights(path, config)}
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in names
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names


def test_weights_have_the_shapes_of_a_transformers_model(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(tmp_path / "llama.gguf")
    _write_gguf(path, "llama", _tiny_tensors(with_bias=False, with_output=True), GGMLQuantizationType.Q4_1)
    config = load_gguf_config(path)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "torch_dtype"}))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in iter_gguf_weights(path, config)} == expected


def test_unknown_architecture_error_names_it(tmp_path: Path) -> None:
    path = str(tmp_path / "mamba.gguf")
    _write_gguf(path, "mamba", {"token_embd.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(ValueError, match="'mamba'"):
        load_gguf_config(path)


def test_non_gguf_file_is_rejected_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(str(path))


@pytest.mark.parametrize("num_bytes", [100, 2_000_000])
def test_truncated_file_is_rejected_with_its_path(model_path: str, tmp_path: Path, num_bytes: int) -> None:
    truncated = tmp_path / "cut.gguf"
    with open(model_path, "rb") as f:
        truncated.write_bytes(f.read(num_bytes))
    with pytest.raises(ValueError, match="cut.gguf is truncated"):
        read_gguf(str(truncated))
