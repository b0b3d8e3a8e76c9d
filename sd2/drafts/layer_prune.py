"""Rule layer_prune: the layer-pruned baseline, whole decoder layers removed from a dense draft.

The aim is the per-token linear MACs of the same draft at `sparsity` percent unstructured
sparsity (sd2.macs.linear_macs: every decoder linear sparse, lm_head dense). Whole layers
only come in steps of one layer's MACs, so we drop the most layers that keep the MACs
*not below* the aim: the baseline never gets less compute than the sparse draft it is
compared with, and overshoots by less than one layer's MACs.
"""

import math

import torch

from sd2.checkpoint import save_checkpoint
from sd2.macs import linear_macs, model_macs
from sd2.models import decoder_layers, load_model, load_tokenizer
from sd2.provenance import provenance


def layers_to_keep(config, sparsity: int) -> int:
    """Fewest layers whose dense MACs are not below those of the full draft at `sparsity`%."""
    n = config.num_hidden_layers
    aim = linear_macs(config, sparsity / 100)["macs_per_token"]
    dense = linear_macs(config)
    per_layer = dense["decoder_linear_macs"] / n
    keep = math.ceil((aim - dense["lm_head_macs"]) / per_layer - 1e-9)  # tolerance: exact multiples are not rounded up
    return max(min(n, keep), min(n, 2))  # first and last layer always stay


def default_drop(n_layers: int, n_drop: int) -> list[int]:
    """n_drop layers spread evenly over the interior 1..n_layers-2, centred on the middle."""
    inner = n_layers - 2
    if n_drop > max(inner, 0):
        raise ValueError(f"cannot drop {n_drop} of {n_layers} layers while keeping the first and the last")
    # The centre of each of n_drop equal bins of the interior: distinct, symmetric, middle-out.
    return [1 + int((j + 0.5) * inner / n_drop) for j in range(n_drop)]


def remove_layers(model, drop: list[int]) -> list[int]:
    """Remove decoder layers in place; renumber the kept ones so the KV cache lines up."""
    layers = decoder_layers(model)
    n = len(layers)
    bad = [i for i in drop if not 0 <= i < n]
    if bad or len(set(drop)) != len(drop):
        raise ValueError(f"layers to drop must be distinct indices in [0, {n}), got {drop}")
    keep = [i for i in range(n) if i not in set(drop)]
    if not keep:
        raise ValueError("cannot drop every decoder layer")
    model.base_model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    for new_idx, layer in enumerate(model.base_model.layers):
        # Attention modules index the KV cache by layer_idx: it must follow the new order.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    return keep


def layer_prune(draft_dir, out_dir, *, sparsity: int, drop: list[int] | None = None, dtype="auto") -> dict:
    """Drop decoder layers of `draft_dir` to about the MACs of the draft at `sparsity`%; save to out_dir."""
    if not isinstance(sparsity, int) or isinstance(sparsity, bool) or not 0 <= sparsity < 100:
        raise ValueError(f"sparsity must be an integer percent in [0, 100), got {sparsity!r}")
    tokenizer = load_tokenizer(draft_dir)
    model = load_model(draft_dir, dtype=dtype)  # on the CPU, saved in the dtype it loads in
    n = model.config.num_hidden_layers
    aim = linear_macs(model.config, sparsity / 100)
    dense = linear_macs(model.config)
    if drop is None:
        drop = default_drop(n, n - layers_to_keep(model.config, sparsity))
    summary = {
        "sparsity": sparsity,
        **_drop_layers(model, drop),
        "target_macs_per_token": aim["macs_per_token"],
        "dense_macs_per_token": dense["macs_per_token"],
        "layer_macs": dense["decoder_linear_macs"] // n,
        "rule": "drop the most layers whose MACs stay >= the sparse draft's (first and last layer kept)",
    }
    info = provenance(seed=None, draft=str(draft_dir), sparsity=sparsity, drop=summary["dropped_layers"])
    info.update(summary)
    save_checkpoint(model, tokenizer, out_dir, info)
    return summary


def layer_subset(model_dir, out_dir, *, keep: int, dtype="auto") -> dict:
    """A draft of `keep` of the model's decoder layers: the first, the last, the rest spread evenly (default_drop).

    The same rule as the layer-pruned baseline's, so that a draft cut from the target and a
    baseline cut from that draft keep layers the same way.
    """
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype)
    n = model.config.num_hidden_layers
    if not 2 <= keep <= n:
        raise ValueError(f"layers_of.keep must be in [2, {n}] for {model_dir} ({n} decoder layers), got {keep}")
    summary = {**_drop_layers(model, default_drop(n, n - keep)), "rule": "first and last layer, the rest spread evenly"}
    info = provenance(seed=None, model=str(model_dir), keep=keep)
    info.update(summary)
    save_checkpoint(model, tokenizer, out_dir, info)
    return summary


def _drop_layers(model, drop: list[int]) -> dict:
    n = model.config.num_hidden_layers
    drop = sorted(int(i) for i in drop)
    keep = remove_layers(model, drop)
    return {
        "dropped_layers": drop,
        "kept_layers": keep,
        "num_hidden_layers": len(keep),
        "original_num_hidden_layers": n,
        "achieved_macs_per_token": model_macs(model)["macs_per_token"],
    }
