"""Weight bytes per token: layouts by hand on one layer, and a whole tiny model's sum."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sd2.masks import magnitude_mask
from sd2.measure.weight_bytes import layer_bytes, model_weight_bytes


def test_layouts_by_hand():
    # 64 x 256 at 50%: 8,192 non-zeros of 16,384.
    b = layer_bytes(64, 256, 8192)
    assert b["dense"] == 16384 * 2
    assert b["bitmask"] == 16384 / 8 + 8192 * 2
    assert b["csr"] == 8192 * (2 + 2) + 65 * 4
    # w4a16, groups of 128 inputs: 2 scales per row, 16 bits each.
    q = layer_bytes(64, 256, 8192, "w4a16")
    assert q["dense"] == 16384 / 2 + 64 * 2 * 2
    assert q["bitmask"] == 16384 / 8 + 8192 / 2 + 64 * 2 * 2
    # w8a16: one scale per row; a group wider than the row is one group.
    assert layer_bytes(64, 256, 0, "w8a16")["dense"] == 16384 + 64 * 2
    assert layer_bytes(64, 100, 0, "w4a16")["dense"] == 6400 / 2 + 64 * 2
    # CSR needs 32-bit indices past 65,536 columns.
    assert layer_bytes(1, 70000, 10)["csr"] == 10 * (16 + 32) / 8 + 2 * 4


def test_unknown_scheme_is_named():
    # A group that does not divide the inputs: the largest that does (176 inputs: 2 groups of 88).
    assert layer_bytes(4, 176, 0, "w4a16")["dense"] == 4 * 176 / 2 + 4 * 2 * 2
    with pytest.raises(ValueError, match="'w3a16'"):
        layer_bytes(4, 8, 0, "w3a16")


@pytest.fixture
def model():
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_dense_model_reads_every_weight_at_16_bits(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    expected = sum(m.weight.numel() for m in linears) * 2 + 64 * 2  # + one embedding row
    got = model_weight_bytes(model)
    assert got["weight_bytes_per_token"] == got["dense_weight_bytes_per_token"] == expected
    assert got["weight_layouts"] == {"dense": len(linears)}


def test_sparse_and_quantized_models_read_less(model):
    dense = model_weight_bytes(model)["weight_bytes_per_token"]
    lm_head = model.get_output_embeddings().weight.numel() * 2
    with torch.no_grad():
        for m in model.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(magnitude_mask(m.weight, 0.5))
    sparse = model_weight_bytes(model)
    decoder_dense = dense - lm_head - 64 * 2
    # 50% at 16 bits: bitmask, 1/16 + 1/2 of the dense bytes, in every decoder layer.
    assert sparse["weight_layouts"] == {"bitmask": 14, "dense": 1}
    assert sparse["weight_bytes_per_token"] == round(decoder_dense * (1 / 16 + 1 / 2) + lm_head + 64 * 2)
    w4 = model_weight_bytes(model, "w4a16")
    assert w4["weight_bytes_per_token"] < sparse["weight_bytes_per_token"] < dense
    assert w4["dense_weight_bytes_per_token"] == dense and w4["quantization"] == "w4a16"
