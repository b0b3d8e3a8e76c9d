import json

import pytest
import torch
from transformers import AutoTokenizer

from sd2.drafts.layer_prune import default_drop, layer_prune, layer_subset, remove_layers
from sd2.macs import linear_macs, model_macs
from sd2.models import build_model, load_model, load_tokenizer

SIZES = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512
)


def _deep_model(path, arch, tokenizer_dir, layers):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    build_model({"arch": arch, **SIZES, "num_hidden_layers": layers}, tok, seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deep_llama_dir(tmp_path_factory, byte_tokenizer_dir):
    return _deep_model(tmp_path_factory.mktemp("deep_llama"), "llama", byte_tokenizer_dir, 6)


def _generates_with_cache(model_dir, model=None):
    """Greedy output with the KV cache equals the output without: every layer reads its own cache slot."""
    tok, model = load_tokenizer(model_dir), model or load_model(model_dir)
    enc = tok("def f(x):\n    return", return_tensors="pt")
    with torch.no_grad():
        outs = [
            model.generate(**enc, max_new_tokens=10, do_sample=False, use_cache=c, pad_token_id=tok.pad_token_id)
            for c in (True, False)
        ]
    assert outs[0].shape[1] == enc["input_ids"].shape[1] + 10
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("sparsity,kept", [(30, 5), (50, 3), (70, 2)])
def test_macs_hit_the_aim(deep_llama_dir, tmp_path, sparsity, kept):
    summary = layer_prune(deep_llama_dir, tmp_path / "lp", sparsity=sparsity)
    model = load_model(tmp_path / "lp")
    assert model.config.num_hidden_layers == len(model.model.layers) == kept
    assert summary["kept_layers"][0] == 0 and summary["kept_layers"][-1] == 5
    aim = linear_macs(load_model(deep_llama_dir).config, sparsity / 100)["macs_per_token"]
    achieved = model_macs(model)["macs_per_token"]
    layer = summary["layer_macs"]
    assert achieved == summary["achieved_macs_per_token"] == linear_macs(model.config)["macs_per_token"]
    if kept > 2:  # at 70% even two layers are above the aim; first and last stay regardless
        assert aim <= achieved < aim + layer
    info = json.loads((tmp_path / "lp" / "provenance.json").read_text())
    assert info["dropped_layers"] == summary["dropped_layers"] and info["target_macs_per_token"] == aim
    _generates_with_cache(tmp_path / "lp")


def test_kept_layers_keep_their_weights(deep_llama_dir, tmp_path):
    summary = layer_prune(deep_llama_dir, tmp_path / "lp", sparsity=50, drop=[2, 3, 4])
    assert summary["kept_layers"] == [0, 1, 5]
    before, after = load_model(deep_llama_dir), load_model(tmp_path / "lp")
    for new, old in enumerate([0, 1, 5]):
        assert torch.equal(after.model.layers[new].mlp.up_proj.weight, before.model.layers[old].mlp.up_proj.weight)
        assert after.model.layers[new].self_attn.layer_idx == new
    # The in-memory model (not only a reloaded one) has a consistent cache layout.
    in_memory = load_model(deep_llama_dir)
    remove_layers(in_memory, [2, 3, 4])
    assert [layer.self_attn.layer_idx for layer in in_memory.model.layers] == [0, 1, 2]
    _generates_with_cache(deep_llama_dir, in_memory)


def test_explicit_drop_on_qwen(tmp_path, meta_tokenizer_dir):
    src = _deep_model(tmp_path / "qwen", "qwen2", meta_tokenizer_dir, 4)
    summary = layer_prune(src, tmp_path / "lp", sparsity=50, drop=[1])
    model = load_model(tmp_path / "lp")
    assert summary["kept_layers"] == [0, 2, 3] and len(model.config.layer_types) == 3
    _generates_with_cache(tmp_path / "lp")
    with pytest.raises(ValueError, match="distinct"):
        layer_prune(src, tmp_path / "bad", sparsity=50, drop=[4])


def test_default_drop_is_interior_and_centred():
    assert default_drop(16, 8) == [1, 3, 5, 7, 8, 10, 12, 14]
    assert default_drop(5, 1) == [2]
    assert default_drop(6, 4) == [1, 2, 3, 4]
    assert default_drop(6, 0) == []
    with pytest.raises(ValueError):
        default_drop(4, 3)


def test_layer_subset_keeps_the_first_last_and_spread_layers_with_their_weights(deep_llama_dir, tmp_path):
    """A draft cut from a model: the layers default_drop keeps, with the model's own weights; its KV cache works."""
    out = tmp_path / "subset"
    summary = layer_subset(deep_llama_dir, out, keep=3)
    assert summary["kept_layers"] == [0, 2, 5] and summary["num_hidden_layers"] == 3
    whole, part = load_model(deep_llama_dir), load_model(out)
    for new, old in enumerate(summary["kept_layers"]):
        for (name, a), (_, b) in zip(
            part.model.layers[new].named_parameters(), whole.model.layers[old].named_parameters()
        ):
            assert torch.equal(a, b), (new, old, name)
    assert torch.equal(part.lm_head.weight, whole.lm_head.weight)
    assert json.loads((out / "provenance.json").read_text())["settings"]["keep"] == 3
    _generates_with_cache(out, part)


def test_layer_subset_refuses_more_layers_than_the_model_has(deep_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"keep must be in \[2, 6\]"):
        layer_subset(deep_llama_dir, tmp_path / "subset", keep=7)
    assert not (tmp_path / "subset").exists()
