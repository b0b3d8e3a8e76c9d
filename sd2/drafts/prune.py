"""Rule prune: one-shot pruning of the decoder linear layers (SparseGPT / Wanda / magnitude).

Only the nn.Linear layers inside the decoder blocks are pruned (q, k, v, o, gate, up,
down for Llama-like models); embeddings and lm_head stay dense, as in the paper.
SparseGPT and Wanda run through llm-compressor's `oneshot()`; 'magnitude' needs nothing.
Every pruned layer ends with exactly round(sparsity * numel) zeros (2:4: exactly two of
every four consecutive inputs), checked before saving.
"""

import time

import torch
from datasets import Dataset

from sd2.calibration import calibration_set
from sd2.checkpoint import save_checkpoint
from sd2.masks import magnitude_mask, n_zeros, nm_mask
from sd2.models import decoder_layers, decoder_linears, load_model, load_tokenizer
from sd2.provenance import provenance

PRUNERS = ("sparsegpt", "wanda", "magnitude")
STRUCTURES = ("unstructured", "2:4")


# ---- the maths: small pure functions on one weight matrix ----


def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At least n zeros in every group of m consecutive inputs."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight == 0).reshape(rows, cols // m, m).sum(-1)
    return bool((zeros >= n).all())


def exact_sparsity(pruned: torch.Tensor, original: torch.Tensor, sparsity: float) -> tuple[torch.Tensor, int]:
    """Adjust a pruner's result to exactly round(sparsity * numel) zeros.

    Too few zeros (Wanda rounds down per row): the smallest |w| of the result are zeroed.
    Too many (SparseGPT's per-block threshold `<=` prunes one extra weight per 128-column
    block): the pruned weights with the largest original |w| get their original value back.
    Returns the new weight and the change in zeros (+ added, - restored).
    """
    k = n_zeros(sparsity, pruned.numel())
    # llm-compressor returns the pruned weights on the GPU where there is one; the originals were kept on the CPU.
    flat, orig = pruned.flatten().clone(), original.to(pruned.device).flatten()
    zero = flat == 0
    extra = int(zero.sum()) - k
    if extra < 0:
        magnitude = flat.abs().masked_fill(zero, float("inf"))
        flat[magnitude.argsort(stable=True)[:-extra]] = 0
    elif extra > 0:
        restorable = zero & (orig != 0)
        if int(restorable.sum()) < extra:
            raise ValueError(f"cannot restore {extra} weights: too few non-zero originals")
        candidates = orig.abs().masked_fill(~restorable, -1.0)
        idx = candidates.argsort(descending=True, stable=True)[:extra]
        flat[idx] = orig[idx]
    return flat.view_as(pruned), -extra


def check_sparsity(model, sparsity: float, structure: str) -> dict[str, float]:
    """Raise naming the first layer whose sparsity is not the requested one; else return all."""
    measured = {}
    for name, module in decoder_linears(model).items():
        w = module.weight
        zeros, numel = int((w == 0).sum()), w.numel()
        if zeros != n_zeros(sparsity, numel):
            raise RuntimeError(
                f"layer {name}: sparsity {zeros / numel:.6f} ({zeros} zeros of {numel}), "
                f"requested {sparsity:.4f} ({n_zeros(sparsity, numel)} zeros)"
            )
        if structure == "2:4" and not is_nm(w):
            raise RuntimeError(f"layer {name}: not 2:4 sparse (some group of 4 inputs keeps more than 2 weights)")
        measured[name] = zeros / numel
    return measured


# ---- plumbing ----


def _llmcompressor_prune(
    model_dir, tokenizer, calib: Dataset, pruner: str, sparsity: float, structure: str, seq_len: int, dtype
):
    """Run oneshot() on a fresh copy of the model; return the pruned decoder weights."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model = load_model(model_dir, dtype=dtype)  # oneshot wraps save_pretrained and adds hooks: use a throwaway copy
    block = type(decoder_layers(model)[0]).__name__
    modifier_cls = SparseGPTModifier if pruner == "sparsegpt" else WandaPruningModifier
    modifier = modifier_cls(
        sparsity=sparsity,
        mask_structure="2:4" if structure == "2:4" else "0:0",
        targets=[block],  # prunable layers inside decoder blocks only: lm_head and embeddings stay dense
    )
    oneshot(
        model=model,
        recipe=modifier,
        dataset=calib,
        processor=tokenizer,
        num_calibration_samples=len(calib),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,  # the sample was already drawn with the seed
        batch_size=1,
    )
    return {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}


def _check_request(sparsity: int, pruner: str, structure: str) -> None:
    """Raise naming the bad value where (sparsity, pruner, structure) is not something prune makes."""
    if not isinstance(sparsity, int) or isinstance(sparsity, bool) or not 0 <= sparsity < 100:
        raise ValueError(f"sparsity must be an integer percent in [0, 100), got {sparsity!r}")
    if pruner not in PRUNERS:
        raise ValueError(f"unknown pruner {pruner!r} (known: {', '.join(PRUNERS)})")
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r} (known: {', '.join(STRUCTURES)})")
    if structure == "2:4" and sparsity != 50:
        raise ValueError(f"2:4 structure is exactly 50% sparsity, got {sparsity}")


def _pruned_weights(
    model_dir, calibration_dir, tokenizer, original: dict, sparsity: int, settings: dict, seed: int, dtype
) -> tuple[dict, dict | None]:
    """(the pruner's decoder weights by layer name, the calibration format; None where no data was read)."""
    pruner, structure = settings["pruner"], settings["structure"]
    fraction = sparsity / 100
    if sparsity == 0:
        return original, None
    if pruner == "magnitude":
        mask = nm_mask if structure == "2:4" else (lambda w: magnitude_mask(w, fraction))
        return {n: w * mask(w) for n, w in original.items()}, None
    seq_len = settings["calibration_seq_len"]
    calib, calibration_format = calibration_set(
        calibration_dir, tokenizer, settings["calibration_samples"], seq_len, seed, settings.get("chat")
    )
    pruned = _llmcompressor_prune(model_dir, tokenizer, calib, pruner, fraction, structure, seq_len, dtype)
    return pruned, calibration_format


def _set_weights(linears: dict, pruned: dict, original: dict, fraction: float, structure: str, pruner: str) -> dict:
    """Copy the pruned weights into `linears`, unstructured ones fixed to the exact sparsity; the fixes by layer."""
    fixed = {}
    with torch.no_grad():
        for name, module in linears.items():
            weight = pruned[name]
            if structure == "unstructured":
                weight, moved = exact_sparsity(weight, original[name], fraction)
                if moved:
                    fixed[name] = moved
            module.weight.copy_(weight)
    if fixed:
        moved = sum(abs(v) for v in fixed.values())
        print(
            f"prune: {pruner} missed the exact sparsity in {len(fixed)} layer(s); "
            f"fixed by moving {moved} weight(s) (provenance: exactness_fix)"
        )
    return fixed


def prune(
    model_dir,
    calibration_dir,
    out_dir,
    *,
    sparsity: int,
    settings: dict,
    seed: int,
    dtype="auto",
) -> dict:
    """Prune every decoder linear of `model_dir` to `sparsity` percent and save to `out_dir`.

    settings: the config's prune section (pruner, structure, calibration_samples, calibration_seq_len).

    Returns the summary also stored in provenance.json: measured per-layer sparsity and
    how many weights the exactness fix moved per layer.
    """
    pruner, structure = settings["pruner"], settings["structure"]
    calibration_samples, calibration_seq_len = settings["calibration_samples"], settings["calibration_seq_len"]
    _check_request(sparsity, pruner, structure)
    fraction = sparsity / 100
    torch.manual_seed(seed)
    start = time.time()

    tokenizer = load_tokenizer(model_dir)
    # On the CPU: llm-compressor moves one layer at a time to the GPU; the pruned copy keeps this dtype.
    model = load_model(model_dir, dtype=dtype)
    linears = decoder_linears(model)
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    pruned, calibration_format = _pruned_weights(
        model_dir, calibration_dir, tokenizer, original, sparsity, settings, seed, dtype
    )
    fixed = _set_weights(linears, pruned, original, fraction, structure, pruner)

    measured = check_sparsity(model, fraction, structure)
    total = sum(m.weight.numel() for m in linears.values())
    summary = {
        "sparsity": sparsity,
        "pruner": pruner,
        "structure": structure,
        "decoder_linear_sparsity": sum(s * linears[n].weight.numel() for n, s in measured.items()) / total,
        "layer_sparsity": measured,
        "exactness_fix": fixed,
        "seconds": round(time.time() - start, 2),
    }
    info = provenance(
        seed=seed,
        model=str(model_dir),
        calibration=str(calibration_dir),
        sparsity=sparsity,
        pruner=pruner,
        structure=structure,
        calibration_samples=calibration_samples,
        calibration_seq_len=calibration_seq_len,
        calibration_format=calibration_format,
    )
    info.update(summary)
    save_checkpoint(model, tokenizer, out_dir, info)
    return summary
