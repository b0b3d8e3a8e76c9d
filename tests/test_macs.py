"""MACs: hand counts, the paper's 43.87%, and non-zero counting of a real (tiny) model."""

import json

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

from sd2 import config as sd2_config
from sd2 import macs
from sd2.models import scratch_config
from sd2.shapes import SHAPE_KEYS, count_params


def tiny_llama(**kw):
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
        tie_word_embeddings=True,
    )
    return LlamaConfig(**{**sizes, **kw})


def test_llama_hand_count():
    got = macs.linear_macs(tiny_llama())
    per_layer = 4 * 32 * 32 + 3 * 32 * 64  # q, k, v, o + gate, up, down
    assert got["decoder_linear_macs"] == 2 * per_layer
    assert got["lm_head_macs"] == 100 * 32
    assert got["macs_per_token"] == got["dense_macs_per_token"] == 2 * per_layer + 3200
    assert got["num_hidden_layers"] == 2


def test_gqa_and_explicit_head_dim():
    got = macs.linear_macs(tiny_llama(num_key_value_heads=2))
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64  # k, v project to 2 heads x 8
    assert got["decoder_linear_macs"] == 2 * per_layer
    wide = macs.linear_macs(tiny_llama(num_key_value_heads=2, head_dim=16))
    per_layer = 2 * 32 * 64 + 2 * 32 * 32 + 3 * 32 * 64  # q, o: 4 heads x 16; k, v: 2 x 16
    assert wide["decoder_linear_macs"] == 2 * per_layer


def test_qwen2_and_gpt_neox():
    qwen = Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=50,
    )
    assert macs.linear_macs(qwen)["decoder_linear_macs"] == 3 * (2 * 32 * 32 + 2 * 32 * 8 + 3 * 32 * 48)
    neox = GPTNeoXConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=50
    )
    # query_key_value (3h x h) + dense (h x h) + two MLP matrices
    assert macs.linear_macs(neox)["decoder_linear_macs"] == 2 * (4 * 32 * 32 + 2 * 32 * 128)


@pytest.mark.parametrize(
    "config",
    [
        tiny_llama(num_key_value_heads=2),
        Qwen2Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=50,
        ),
        GPTNeoXConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=50),
    ],
)
def test_analytic_matches_counted(config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert macs.model_macs(model)["macs_per_token"] == macs.linear_macs(config)["macs_per_token"]


def test_llama_3b_paper_reduction():
    config = LlamaConfig(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    got = macs.linear_macs(config, sparsity=0.5)
    assert round(100 * (1 - got["macs_per_token"] / got["dense_macs_per_token"]), 2) == 43.87
    assert round(100 * got["reduction"], 2) == 43.87


def test_half_zeroed_model_matches_analytic():
    config = tiny_llama(num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
                flat = module.weight.view(-1)
                flat[torch.randperm(flat.numel())[: flat.numel() // 2]] = 0.0
    counted = macs.model_macs(model)
    analytic = macs.linear_macs(config, sparsity=0.5)
    assert counted["macs_per_token"] == analytic["macs_per_token"]
    assert counted["dense_macs_per_token"] == analytic["dense_macs_per_token"]
    assert counted["lm_head_macs"] == 100 * 32  # tied lm_head counts dense


def test_sparsity_validation():
    with pytest.raises(ValueError, match="sparsity"):
        macs.linear_macs(tiny_llama(), 1.0)
    with pytest.raises(ValueError, match="--sparsity"):
        macs.cli("whatever", 100)


def test_resolve_config_and_cli(tmp_path, tiny_llama_dir):
    config_file = tmp_path / "config.json"
    tiny_llama().to_json_file(config_file)
    assert macs.resolve_config(str(config_file)).hidden_size == 32
    with pytest.raises(FileNotFoundError, match="no-such-model-xyz"):
        macs.resolve_config("no-such-model-xyz")
    analytic = macs.cli(str(config_file), 50)
    assert analytic["counted"] == "analytic"
    assert analytic["decoder_linear_macs"] == analytic["dense_decoder_linear_macs"] // 2
    counted = macs.cli(str(tiny_llama_dir), None)
    assert counted["counted"] == "non-zero weights"
    assert counted["macs_per_token"] == macs.linear_macs(macs.resolve_config(str(tiny_llama_dir)))["macs_per_token"]
    json.dumps(counted)


def _hub_shape(model_type: str, **sizes) -> dict:
    """A hub model's `shape` entry, its params_b counted as a model of `model_type` has them."""
    sizes = {"tie_word_embeddings": False, "dtype": "bfloat16", **sizes}
    return {**sizes, "params_b": count_params({"model_type": model_type, **sizes}) / 1e9}


def test_config_hub_shape_is_counted_without_a_download():
    config = sd2_config.load(REPO / "config" / "paper.yaml")
    for name, spec in config["models"].items():
        assert "shape" in spec and not spec["hub"].startswith(("/", ".")), name
        sizes = {k: spec["shape"][k] for k in SHAPE_KEYS}
        family = Qwen2Config if "qwen" in name else LlamaConfig
        expected = macs.linear_macs(family(**sizes, tie_word_embeddings=spec["shape"]["tie_word_embeddings"]), 0.5)
        got = macs.config_macs(name, config, 50)
        assert got["counted"] == "analytic" and got["model"] == name and got["sparsity_percent"] == 50
        assert {k: got[k] for k in expected} == expected, name


def test_config_hub_shape_of_a_plain_mlp():
    sizes = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        vocab_size=300,
    )
    config = {"models": {"neox": {"hub": "org/not-downloaded", "shape": _hub_shape("gpt_neox", **sizes)}}}
    expected = macs.linear_macs(GPTNeoXConfig(**{k: v for k, v in sizes.items() if k != "head_dim"}))
    got = macs.config_macs("neox", config, None)
    assert {k: got[k] for k in expected} == expected
    # A parameter count no MLP explains is named, not guessed.
    config["models"]["neox"]["shape"]["params_b"] *= 3
    with pytest.raises(ValueError, match=r"models\.neox\.shape: .*not an MLP's 2"):
        macs.config_macs("neox", config, None)


class _Vocabulary:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 1

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def test_config_from_scratch_model_and_every_model():
    config = sd2_config.load(REPO / "config" / "test.yaml")
    spec = config["models"]["tiny-draft"]
    vocab = config["tokenizers"][spec["tokenizer"]]["vocab_size"]
    expected = macs.linear_macs(scratch_config(spec, _Vocabulary(vocab)), 0.5)
    got = macs.config_macs("tiny-draft", config, 50)
    assert {k: got[k] for k in expected} == expected
    every = macs.every_config_macs("config/test.yaml", config, 50)
    assert every["config"] == "config/test.yaml" and list(every["models"]) == list(config["models"])
    assert every["models"]["tiny-draft"] == got


def test_config_errors_name_the_input(tmp_path, tiny_llama_dir):
    config = sd2_config.load(REPO / "config" / "test.yaml")
    with pytest.raises(ValueError, match=r"unknown model 'nope' \(known: tiny-llama, tiny-qwen, tiny-draft\)"):
        macs.config_macs("nope", config, None)
    with pytest.raises(ValueError, match="--sparsity"):
        macs.config_macs("tiny-draft", config, 100)
    config["models"] = {"local": {"hub": str(tiny_llama_dir)}, "gone": {"hub": "org/not-in-the-cache-xyz"}}
    assert macs.config_macs("local", config, None)["counted"] == "non-zero weights"
    with pytest.raises(FileNotFoundError, match=r"(?s)models\.gone: .*org/not-in-the-cache-xyz.*models\.gone\.shape"):
        macs.config_macs("gone", config, None)
    # A workflow config where a config.json is expected: named, with the way to pass it.
    with pytest.raises(ValueError, match=r"test\.yaml: not a model's config\.json.*--config"):
        macs.resolve_config(str(REPO / "config" / "test.yaml"))
