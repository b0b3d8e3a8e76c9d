"""Model sizes from a config alone (no torch, no weights): a hub model's `shape`, a local
checkpoint's config.json, or a from-scratch spec. The memory plan, the registry's tokenizer check
and `sd2 macs` read them."""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from sd2.errors import ConfigError

GATED_MLP = {"llama", "mistral", "qwen2", "qwen3"}
PLAIN_MLP = {"gpt_neox"}
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


@dataclass(frozen=True)
class Shape:
    """The sizes the plan needs; `dtype` is the one the checkpoint stores (what dtype auto loads)."""

    params: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tied: bool
    dtype: str

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (everything but the embedding, lm_head and final norm)."""
        heads = (1 if self.tied else 2) * self.embedding_params
        return (self.params - heads - self.hidden_size) // self.num_hidden_layers

    @property
    def layer_linear_inputs(self) -> list[int]:
        """in_features of each linear of a decoder layer: q, k, v, o, gate, up, down."""
        h = self.hidden_size
        return [h, h, h, self.num_attention_heads * self.head_dim, h, h, self.intermediate_size]


def count_params(cfg: dict) -> int:
    """Parameters of a decoder-only model from its config.json sizes (norms and Qwen2's q/k/v biases included)."""
    kind = cfg["model_type"]
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    if kind in GATED_MLP:
        mlp, biases, norms = 3 * h * i, (heads + 2 * kv) * head_dim if kind == "qwen2" else 0, 2 * h
    elif kind in PLAIN_MLP:
        # GPT-NeoX: every linear has a bias, and each layer norm has a bias too.
        mlp, biases, norms = 2 * h * i, 3 * heads * head_dim + h + i + h, 4 * h
    else:
        raise ValueError(f"cannot count the parameters of model type '{kind}' (known: {sorted(GATED_MLP | PLAIN_MLP)})")
    embeddings = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    final_norm = 2 * h if kind in PLAIN_MLP else h
    return layers * (attention + mlp + biases + norms) + embeddings + final_norm


def shape_from_config(cfg: dict, dtype: str) -> Shape:
    """A Shape from a config.json dict (or a from-scratch spec with model_type set)."""
    heads = cfg["num_attention_heads"]
    return Shape(
        params=count_params(cfg),
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
        dtype=dtype,
    )


def model_shape(name: str, config: dict) -> Shape:
    """Sizes of config["models"][name]: its `shape`, its local config.json, or its from-scratch spec."""
    spec = config["models"][name]
    if "shape" in spec:
        s = spec["shape"]
        return Shape(
            params=round(s["params_b"] * 1e9),
            tied=s["tie_word_embeddings"],
            dtype=s["dtype"],
            **{k: s[k] for k in SHAPE_KEYS},
        )
    if "layers_of" in spec:
        whole = model_shape(spec["layers_of"]["model"], config)
        keep = spec["layers_of"]["keep"]
        return replace(
            whole, num_hidden_layers=keep, params=whole.params - (whole.num_hidden_layers - keep) * whole.layer_params
        )
    if "hub" not in spec:
        tokenizer = config["tokenizers"][spec["tokenizer"]]
        vocab = tokenizer.get("vocab_size") or model_shape(tokenizer["model"], config).vocab_size
        # build_model creates from-scratch models in float32 and pretrain saves them so.
        return shape_from_config({**spec, "model_type": spec["arch"], "vocab_size": vocab}, "float32")
    local = Path(spec["hub"]).expanduser() / "config.json"
    if local.is_file():
        cfg = json.loads(local.read_text())
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
        stored = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        try:
            return shape_from_config(cfg, stored)
        except (KeyError, ValueError) as e:
            raise ConfigError(
                f"config error at models.{name}: cannot size {local} ({e}); give models.{name}.shape"
            ) from e
    raise ConfigError(
        f"config error at models.{name}.shape: '{spec['hub']}' is a hub id, and the memory plan (resources.gpu > 0) "
        "needs its sizes before anything is downloaded; add `shape: {params_b, hidden_size, intermediate_size, "
        "num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size, tie_word_embeddings}` "
        "from the model's config.json, or point `hub` at a local checkpoint directory"
    )
