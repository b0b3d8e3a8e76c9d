"""Model registry: real checkpoints by hub id or path, or from-scratch transformers models."""

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from sd2.quantized import is_quantized, load_quantized

GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
ARCH_CONFIG = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gpt_neox": "gpt_neox"}


def scratch_config(spec: dict, tokenizer):
    """A transformers config for a from-scratch model of the given sizes and tokenizer."""
    arch = spec["arch"]
    sizes = dict(
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        max_position_embeddings=spec.get("max_position_embeddings", 1024),
        tie_word_embeddings=spec.get("tie_word_embeddings", True),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch != "gpt_neox":
        sizes["num_key_value_heads"] = spec.get("num_key_value_heads", spec["num_attention_heads"])
    return AutoConfig.for_model(ARCH_CONFIG[arch], **sizes)


def build_model(spec: dict, tokenizer, seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(scratch_config(spec, tokenizer), dtype=torch.float32)


def _check_exists(name_or_path: str) -> None:
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists() or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model path {name_or_path} does not exist")


def default_device() -> str:
    """Where every job puts its models: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name):
    """A config dtype name ("auto" stays "auto": the dtype the checkpoint stores) or a torch.dtype as is."""
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (known: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def require_cuda(gpus: int, what: str) -> None:
    """Stop at once when a job planned with `gpus` GPUs finds fewer (a CPU-only torch, no GPU visible)."""
    if gpus <= 0:
        return
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if count < gpus:
        raise RuntimeError(
            f"{what}: planned with {gpus} GPU(s), but torch.cuda.is_available() is {available} and "
            f"{count} GPU(s) are visible (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install the CUDA torch "
            "(make install-gpu) or run with resources.gpu: 0"
        )


def load_model(name_or_path, trust_remote_code: bool = False, dtype="auto", device: str = "cpu", device_map=None):
    """A causal LM in `dtype` ("auto": as stored), on `device`, or spread over the GPUs with device_map="auto"."""
    name_or_path = str(name_or_path)
    _check_exists(name_or_path)
    dtype = torch_dtype(dtype)
    if is_quantized(name_or_path):
        # Dequantized at load: plain linears, so MACs, weight bytes and the decoding loops see the values.
        return load_quantized(name_or_path, dtype=dtype, device=device)
    if device_map is not None:
        # accelerate places the layers over every visible GPU as they load (balanced).
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, dtype=dtype, device_map=device_map
        )
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, dtype=dtype)
    return model.to(device).eval()


def load_checkpoint(
    name_or_path, trust_remote_code: bool = False, device: str | None = None, dtype="auto", device_map=None
):
    """(model, tokenizer), the model on `device` (default: default_device()) in `dtype` ("auto": as stored)."""
    model = load_model(
        name_or_path,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        device=device or default_device(),
        device_map=device_map,
    )
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def load_tokenizer(name_or_path, trust_remote_code: bool = False):
    name_or_path = str(name_or_path)
    _check_exists(name_or_path)
    saved = Path(name_or_path) / "tokenizer_config.json"
    if saved.exists() and json.loads(saved.read_text()).get("tokenizer_class") in GENERIC_TOKENIZERS:
        # A tokenizer trained here: AutoTokenizer would pick the model type's class instead
        # (Qwen2Tokenizer for a qwen2 checkpoint) and rebuild a different pipeline around the vocab.
        tok = PreTrainedTokenizerFast.from_pretrained(name_or_path)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def count_parameters(model, include_embeddings: bool = True) -> int:
    total = sum(p.numel() for p in model.parameters())
    if not include_embeddings:
        total -= model.get_input_embeddings().weight.numel()
    return total


PROBE = "def f(x):\n    return x ** 2  # ünïcode\n"


def same_tokenizer(a, b) -> bool:
    """Interchangeable tokenizers: the same vocabulary and the same ids for a probe text."""
    return a.get_vocab() == b.get_vocab() and a(PROBE)["input_ids"] == b(PROBE)["input_ids"]


def decoder_layers(model):
    """The decoder blocks (model.model.layers for Llama/Qwen/Mistral, gpt_neox.layers for NeoX)."""
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder layers (expected base_model.layers)")
    return layers


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside a decoder block, by its full module name."""
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) in inside}


def layer_sparsity(model) -> dict[str, float]:
    """The fraction of zero weights of every decoder linear, by its full module name."""
    return {n: (m.weight == 0).sum().item() / m.weight.numel() for n, m in decoder_linears(model).items()}
