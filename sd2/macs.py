"""Per-token multiply-accumulates (MACs) of a causal LM.

Definition (the paper's): the weight MACs of the linear layers only, i.e. q, k, v, o, the MLP
projections and lm_head, for one new token. A sparse layer costs its non-zeros; embedding lookups
cost nothing; biases and norms are ignored. Attention-score MACs (QK^T and AV) grow with the
context and are left out, as in the paper's count.
"""

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from sd2.models import load_model
from sd2.shapes import GATED_MLP, PLAIN_MLP, Shape, model_shape


def _text_config(config):
    # Multimodal wrappers keep the language model's sizes in a sub-config.
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _sizes(config) -> dict:
    config = _text_config(config)
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return dict(
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        kv_heads=kv_heads,
        intermediate=intermediate,
        mlp_mats=_mlp_matrices(config.model_type),
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
    )


def _mlp_matrices(model_type: str) -> int:
    """Matrices of an MLP: gated (gate, up, down) or plain (up, down). Only architectures whose config
    names and nn.Linear layout were checked; others fail loudly."""
    if model_type in PLAIN_MLP:
        return 2
    if model_type in GATED_MLP:
        return 3
    raise ValueError(f"linear_macs: unknown architecture '{model_type}' (known: {sorted(GATED_MLP | PLAIN_MLP)})")


def _shape_sizes(shape: Shape, model_type: str | None, where: str) -> dict:
    """The sizes of a config's model shape. Without a model type (a hub model's `shape`), the MLP has the
    number of hidden x intermediate matrices its parameter count leaves after attention (2 or 3)."""
    h, i = shape.hidden_size, shape.intermediate_size
    attention = 2 * h * shape.head_dim * (shape.num_attention_heads + shape.num_key_value_heads)
    mlp_mats = _mlp_matrices(model_type) if model_type else round((shape.layer_params - attention) / (h * i))
    if mlp_mats not in (2, 3):
        raise ValueError(
            f"{where}: its parameter count leaves {mlp_mats} hidden x intermediate matrices per layer after "
            "attention, not an MLP's 2 (up, down) or 3 (gate, up, down): check its params_b and sizes"
        )
    return dict(
        hidden=h,
        heads=shape.num_attention_heads,
        head_dim=shape.head_dim,
        kv_heads=shape.num_key_value_heads,
        intermediate=i,
        mlp_mats=mlp_mats,
        layers=shape.num_hidden_layers,
        vocab=shape.vocab_size,
    )


def _summary(decoder_dense: int, decoder_actual: int, lm_head: int, layers: int) -> dict:
    macs = decoder_actual + lm_head
    dense = decoder_dense + lm_head
    return {
        "macs_per_token": int(macs),
        "dense_macs_per_token": int(dense),
        "lm_head_macs": int(lm_head),
        "decoder_linear_macs": int(decoder_actual),
        "dense_decoder_linear_macs": int(decoder_dense),
        "reduction": 1.0 - macs / dense,
        "num_hidden_layers": int(layers),
    }


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1), got {sparsity}")


def linear_macs(config, sparsity: float = 0.0) -> dict:
    """Analytic per-token linear MACs from a config; `sparsity` applies to every decoder linear."""
    _check_sparsity(sparsity)
    return _analytic(_sizes(config), sparsity)


def _analytic(s: dict, sparsity: float) -> dict:
    q_o = 2 * s["hidden"] * s["heads"] * s["head_dim"]
    k_v = 2 * s["hidden"] * s["kv_heads"] * s["head_dim"]
    mlp = s["mlp_mats"] * s["hidden"] * s["intermediate"]
    decoder_dense = s["layers"] * (q_o + k_v + mlp)
    # Sparse layers cost their non-zeros; rounding per layer does not matter at these sizes.
    decoder_actual = round(decoder_dense * (1.0 - sparsity))
    lm_head = s["vocab"] * s["hidden"]
    return _summary(decoder_dense, decoder_actual, lm_head, s["layers"])


def model_macs(model) -> dict:
    """Per-token linear MACs counted from the model's actual non-zero weights.

    Every nn.Linear except the output embedding is a decoder linear. A tied lm_head is a
    dense vocab x hidden matmul even though its weight is the (dense) embedding table.
    """
    lm_head_module = model.get_output_embeddings()
    decoder_dense = decoder_actual = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not lm_head_module:
            # .weight goes through parametrizations, so a masked (sparse fine-tuned) layer counts its mask.
            weight = module.weight
            decoder_dense += weight.numel()
            decoder_actual += int(torch.count_nonzero(weight))
    lm_weight = lm_head_module.weight
    tied = lm_weight is model.get_input_embeddings().weight
    lm_head = lm_weight.numel() if tied else int(torch.count_nonzero(lm_weight))
    config = _text_config(model.config)
    result = _summary(decoder_dense, decoder_actual, lm_head, config.num_hidden_layers)
    result["dense_macs_per_token"] = int(decoder_dense + lm_weight.numel())
    result["reduction"] = 1.0 - result["macs_per_token"] / result["dense_macs_per_token"]
    return result


def resolve_config(model: str):
    """A config from a checkpoint dir, a config.json path, or a hub id already in the local cache."""
    path = Path(str(model)).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return AutoConfig.from_pretrained(path)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{model}: not a model's config.json ({e}); for a workflow config (YAML) give it as "
                "`sd2 macs CONFIG.yaml` (every model) or `sd2 macs NAME --config CONFIG.yaml`"
            ) from e
        if "model_type" not in data:
            raise ValueError(f"{model}: config.json has no model_type")
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(str(model), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - one clear message whatever the hub client raised
        raise FileNotFoundError(
            f"cannot resolve a model config from '{model}': not a checkpoint dir with config.json, "
            f"not a config.json file, and not a hub id in the local cache ({type(err).__name__}: {err})"
        ) from err


def _has_weights(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))


def _check_percent(sparsity_percent: float | None) -> None:
    if sparsity_percent is not None and not 0.0 <= sparsity_percent < 100.0:
        raise ValueError(f"--sparsity must be a percent in [0, 100), got {sparsity_percent}")


def cli(model: str, sparsity_percent: float | None) -> dict:
    """`python -m sd2 macs MODEL [--sparsity PERCENT]`: the dict the CLI prints as JSON.

    With --sparsity the count is analytic; without it a checkpoint dir with weights is
    counted from its non-zeros, anything else (config file, hub id) analytically at 0%.
    """
    _check_percent(sparsity_percent)
    path = Path(str(model)).expanduser()
    if sparsity_percent is None and path.is_dir() and _has_weights(path):
        result = model_macs(load_model(path))
        result["counted"] = "non-zero weights"
    else:
        config = resolve_config(model)
        result = linear_macs(config, (sparsity_percent or 0.0) / 100.0)
        result["counted"] = "analytic"
    result["model"] = str(model)
    result["sparsity_percent"] = sparsity_percent
    return result


def config_macs(name: str, config: dict, sparsity_percent: float | None) -> dict:
    """`python -m sd2 macs NAME --config CONFIG.yaml`: MACs of the model `name` of a validated workflow config.

    A hub model that is a local checkpoint directory is read as `cli` reads a path; a hub id is sized by
    its `shape` (nothing downloaded), or without one by its config in the local hub cache; a from-scratch
    model by its own sizes. The analytic counts apply --sparsity (default 0%) to every decoder linear.
    """
    _check_percent(sparsity_percent)
    models = config["models"]
    if name not in models:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(models)})")
    spec = models[name]
    local = "hub" in spec and Path(spec["hub"]).expanduser().exists()
    if local or ("hub" in spec and "shape" not in spec):
        try:
            result = cli(spec["hub"], sparsity_percent)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"models.{name}: {e}; or give models.{name}.shape") from e
    else:
        sizes = _shape_sizes(model_shape(name, config), spec.get("arch"), f"models.{name}.shape")
        result = _analytic(sizes, (sparsity_percent or 0.0) / 100.0)
        result["counted"] = "analytic"
        result["sparsity_percent"] = sparsity_percent
    result["model"] = name
    return result


def every_config_macs(config_path: str, config: dict, sparsity_percent: float | None) -> dict:
    """`python -m sd2 macs CONFIG.yaml`: config_macs of every model of the config, by name."""
    return {
        "config": str(config_path),
        "models": {name: config_macs(name, config, sparsity_percent) for name in config["models"]},
    }
