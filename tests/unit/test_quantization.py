"""Weight-only int8 quantization: exact reconstruction bounds and layers equal to their dequantized form."""

from __future__ import annotations

import pytest
import torch

from pagedllm.config import EngineArgs, create_engine_config
from pagedllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from pagedllm.layers.quantization import Int8ColumnParallelLinear, Int8RowParallelLinear, quantize_weight_int8
from tests.models.tiny_models import build_tiny_model


def test_int8_weights_reconstruct_within_half_a_step_per_channel():
    weight = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64)[:, None]
    q, scales = quantize_weight_int8(weight)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    error = (weight - q.float() * scales[:, None]).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("row_parallel", [False, True])
def test_int8_layer_equals_linear_over_dequantized_weight(row_parallel):
    torch.manual_seed(0)
    layer = RowParallelLinear(96, 64) if row_parallel else MergedColumnParallelLinear(96, [32, 32])
    layer.weight.data.normal_()
    quantized = Int8RowParallelLinear(layer) if row_parallel else Int8ColumnParallelLinear(layer)
    x = torch.randn(5, 96).bfloat16()
    dequantized = quantized.weight_int8.float() * quantized.weight_scale.float()[:, None]
    expected = x.float() @ dequantized.t()
    torch.testing.assert_close(quantized(x).float(), expected, rtol=2e-2, atol=5e-2)


def test_int8_is_rejected_with_float32_or_on_a_gpu(tmp_path):
    build_tiny_model("LlamaForCausalLM", str(tmp_path))
    with pytest.raises(ValueError, match="bfloat16"):
        create_engine_config(EngineArgs(model=str(tmp_path), quantization="int8", dtype="float32", device="cpu"))
    config = create_engine_config(EngineArgs(model=str(tmp_path), quantization="int8", device="cpu"))
    assert config.model_config.dtype == "bfloat16"
