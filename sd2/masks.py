"""Sparsity masks: which weights a pruned layer keeps. Pruning, fine-tuning and the draft heads
share these, so a mask means the same thing wherever it is made or held.

Masks are {module name: bool tensor of its weight's shape}; functions that read layers take
{name: nn.Linear} (e.g. sd2.models.decoder_linears(model)), functions that write them the
model whose named_modules() holds those names."""

import torch


def n_zeros(sparsity: float, numel: int) -> int:
    """How many zeros a layer of `numel` weights has at `sparsity` (a fraction)."""
    return round(sparsity * numel)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is kept: the round(sparsity * numel) smallest |w| are dropped."""
    k = n_zeros(sparsity, weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if k == 0:
        return keep.view_as(weight)
    # kthvalue instead of a full sort: seconds less per layer at Llama-3.2-1B's widths. Ties at the
    # threshold are dropped in index order, as a stable argsort would.
    magnitude = weight.detach().abs().flatten()
    threshold = magnitude.kthvalue(k).values
    below = magnitude < threshold
    keep[below] = False
    tied = (magnitude == threshold).nonzero().flatten()
    keep[tied[: k - int(below.sum())]] = False
    return keep.view_as(weight)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask: in every group of m consecutive inputs of a row, the n smallest |w| are dropped."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {cols}")
    groups = weight.abs().reshape(rows, cols // m, m)
    drop = groups.argsort(dim=-1, stable=True)[..., :n]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return keep.reshape(rows, cols)


def sparsity_masks(linears: dict) -> dict[str, torch.Tensor]:
    """mask = (weight != 0) for every layer that has zeros; dense layers get none."""
    return {n: m.weight.detach() != 0 for n, m in linears.items() if bool((m.weight == 0).any())}


def zero_counts(linears: dict) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in linears.items()}


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    """Zero the weights each mask drops."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.mul_(mask)


def hold_masks(model, masks: dict[str, torch.Tensor]):
    """Keep pruned weights at zero during training; returns the after-step hook (sd2.training.train's after_step).

    Masking the gradient keeps AdamW's moments of pruned weights at zero and leaves them
    out of the clipping norm; re-applying the mask after each step guarantees exact zeros.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.register_hook(lambda grad, mask=mask: grad * mask)

    def after_step(model_):
        apply_masks(model_, masks)

    apply_masks(model, masks)
    return after_step


def check_masks(linears: dict, masks: dict, before: dict[str, int], when: str = "during fine-tuning") -> None:
    """Raise unless every pruned weight is zero and every layer has as many zeros as `before` (zero_counts)."""
    after = zero_counts(linears)
    for name, module in linears.items():
        if name in masks and bool((module.weight[~masks[name]] != 0).any()):
            raise RuntimeError(f"layer {name}: a pruned weight became non-zero {when}")
        if after[name] != before[name]:
            raise RuntimeError(f"layer {name}: {before[name]} zeros before fine-tuning, {after[name]} {when}")
