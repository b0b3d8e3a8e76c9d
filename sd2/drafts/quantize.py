"""Rule quantize: weight-only quantization of a (sparse) draft's decoder linears, saved for vLLM.

Schemes: w8a16 (int8, one scale per output row) and w4a16 (int4, one scale per 128 inputs), as
sd2.quantized describes them; activations stay 16-bit. "none" means no quantization: the workflow
skips this step, `quantize` refuses it.

Only the nn.Linear layers inside the decoder blocks are quantized (sd2.models.decoder_linears: q, k,
v, o, gate, up, down); embeddings and lm_head stay as they are, as in prune.py.

Methods: "rtn" (round to nearest, llm-compressor's QuantizationModifier, no data) or "gptq"
(GPTQModifier, Hessians from calibration prompts). Both run inside llm-compressor's `oneshot()` on a
throwaway copy of the model, which is then saved with `save_compressed=True`: the weights as packed
integers ("pack-quantized") plus scales, and a `quantization_config` with
`quant_method: compressed-tensors` in config.json, the format vLLM loads.

The sparsity mask: round to nearest keeps zeros (0 / scale rounds to 0, and a symmetric scheme has
no zero point). llm-compressor's GPTQ does not: its error feedback adds a correction to every
not-yet-quantized column, zeros included, and 0.14 has no option to hold a mask. Measured on the
demo's 70%-sparse SD² draft (llama-draft-m, 64 calibration rows of 256 tokens, w4a16, next-token
distributions on 60 held-out prompts against the unquantized draft): 35k of its 426k zeros came out
non-zero; zeroing them again afterwards throws their correction away (KL 0.0053/token, top-1
agreement 93.1%, no better than round to nearest's 0.0062 and 93.2%). So "gptq" here is mask-aware
GPTQ, as SparseGPT quantizes jointly with a fixed mask: a pruned weight quantizes to 0 and its
error, like any other, is compensated by the columns after it (KL 0.0044, top-1 agreement 93.9%;
GPTQ left to fill the zeros, i.e. a denser draft: 0.0028, 95.5%). It is llm-compressor's eager
GPTQ loop with that one change (`masked_quantize_weight`), swapped into its GPTQModifier for the
call; on a dense model it is bitwise llm-compressor's GPTQ. `check_mask` verifies on the saved
checkpoint, loaded back, that every zero of the input is a zero of the output (rounding adds zeros:
weights under half a step round to 0; those are counted, not an error).

Sparse + quantized storage: compressed-tensors 0.19 dropped its sparse compressors (bitmask,
2:4, marlin-24 are "legacy formats", its ModelCompressor writes `sparsity_config: {}`) and vLLM
removed its sparse kernels, so the checkpoint stores the zeros as quantized zeros; the bytes a
bitmask/CSR layout would save are counted analytically (rule-side, from the mask), not stored.
"""

import contextlib
import copy
import functools
import inspect
import time

import torch

from sd2.calibration import calibration_set
from sd2.checkpoint import atomic_path, write_json
from sd2.models import decoder_linears, layer_sparsity, load_model, load_tokenizer, torch_dtype
from sd2.provenance import provenance
from sd2.quantized import group_size, load_quantized, scheme_spec

METHODS = ("gptq", "rtn")
# GPTQ's Hessian dampening, a fraction of its mean diagonal: llm-compressor's default, not a config setting.
DAMPENING_FRAC = 0.01


# ---- the maths on one weight matrix (also the forward of quantization-aware fine-tuning) ----


def fake_quantize(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """Quantise-dequantise a [out, in] weight as compressed-tensors does, with a straight-through gradient.

    Symmetric: scale = max|w| over the group / ((qmax - qmin) / 2), q = round(clamp(w / scale, qmin,
    qmax)), value q * scale (int4: qmin -8, qmax 7, so scale = max|w| / 7.5 and the largest positive
    weight clips to 7 * scale; int8 likewise with 127.5). The same ops in the same dtype as
    compressed-tensors' observer and `fake_quantize`, so the values match llm-compressor's RTN exactly.
    Zero stays zero. The gradient passes straight through to `weight` (scales are not learned).
    """
    spec = scheme_spec(scheme)
    rows, cols = weight.shape
    size = group_size(scheme, cols)
    q_min, q_max = -(2 ** (spec["num_bits"] - 1)), 2 ** (spec["num_bits"] - 1) - 1
    w = weight.detach().unflatten(-1, (cols // size, size))
    half_range = torch.tensor(q_max - q_min, dtype=w.dtype, device=w.device) / 2
    scale = w.abs().amax(dim=-1, keepdim=True) / half_range
    # An all-zero group: compressed-tensors replaces the zero scale with the dtype's eps (0 stays 0).
    eps = torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype, device=w.device)
    scale = torch.where(scale == 0, eps, scale)
    q = torch.round(torch.clamp(w / scale, q_min, q_max)) * scale
    # q + (w - w.detach()): exactly q in the forward pass, the identity's gradient in the backward.
    return q.flatten(-2) + (weight - weight.detach())


@contextlib.contextmanager
def fake_quantized(model, scheme: str):
    """Within the block the decoder linears compute with fake_quantize(weight): quantization-aware training.

    Only the forward changes: each weight stays the same leaf Parameter (optimizer state, gradient
    hooks such as sd2.masks.hold_masks', state dict untouched) and receives the straight-through
    gradient; scales follow the weights as they train, as they will when the result is quantized.
    """
    scheme_spec(scheme)
    linears = decoder_linears(model)
    for module in linears.values():
        module.forward = functools.partial(_fake_quantized_linear, module, scheme)
    try:
        yield model
    finally:
        for module in linears.values():
            del module.forward  # the instance attribute: nn.Linear.forward again


def _fake_quantized_linear(module: torch.nn.Linear, scheme: str, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, fake_quantize(module.weight, scheme), module.bias)


# ---- the mask ----


def check_mask(before_model, after_model) -> dict[str, int]:
    """Raise naming the first decoder linear where a zero of `before_model` is not a zero of `after_model`.

    Returns, per layer, how many weights became zero on top of the mask (quantization rounds weights
    smaller than half a step to 0: expected, not an error).
    """
    before, after = decoder_linears(before_model), decoder_linears(after_model)
    if before.keys() != after.keys():
        raise RuntimeError(f"decoder linears differ: {sorted(before.keys() ^ after.keys())}")
    added = {}
    for name, module in before.items():
        was, now = module.weight == 0, after[name].weight.to(module.weight.device) == 0
        if was.shape != now.shape:
            raise RuntimeError(f"layer {name}: shape {tuple(was.shape)} became {tuple(now.shape)}")
        lost = int((was & ~now).sum())
        if lost:
            raise RuntimeError(
                f"layer {name}: {lost} of its {int(was.sum())} zeros are no longer zero after quantization"
            )
        added[name] = int((now & ~was).sum())
    return added


# ---- mask-aware GPTQ ----


def masked_quantize_weight(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    global_scale: torch.Tensor | None,
    quant_args,
    blocksize: int = 128,
    percdamp: float = 0.01,
):
    """llm-compressor 0.14's `gptq_quantize.quantize_weight` (eager path) holding the zeros of `weights`.

    Same arguments and results (weights [batch, rows, columns], normalised Hessians, the observer's
    scales; returns the dequantized weights, per-item losses, RTN-fallback flags); the defaults are its
    signature's, which the swap checks. The one change: in the column loop a weight that is zero on
    entry quantizes to 0, and the error (w - 0) is spread over the later columns like any quantization
    error (SparseGPT's joint quantization with a fixed mask).
    """
    from compressed_tensors.quantization import QuantizationStrategy
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, column_scale_window, factorize_hessian

    if quant_args.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
        raise ValueError(f"mask-aware GPTQ supports channel and group strategies, got {quant_args.strategy}")
    batch_size, num_rows, num_columns = weights.shape
    final_dtype, device = weights.dtype, weights.device
    W = weights.to(dtype=GPTQ_PRECISION)
    H = hessians.to(device=device, dtype=GPTQ_PRECISION)
    scale, zero_point = scale.to(device), zero_point.to(device)
    W, H, perm, keep, g_idx = _activation_ordered(W, H, weights != 0, quant_args)

    losses = torch.zeros(batch_size, num_rows, device=device)
    used_rtn_fallback = torch.zeros(batch_size, dtype=torch.bool, device=device)
    Hinv = factorize_hessian(W, H, percdamp, used_rtn_fallback)
    column_args = copy.copy(quant_args)  # one column at a time: the scales come per column from the window
    column_args.strategy = QuantizationStrategy.CHANNEL
    for i1 in range(0, num_columns, blocksize):
        i2 = min(i1 + blocksize, num_columns)
        window = column_scale_window(
            scale, zero_point, global_scale, g_idx, quant_args, num_rows=num_rows, i1=i1, i2=i2
        )
        Q1, Err1 = _masked_block(
            W[:, :, i1:i2].clone(), keep[:, :, i1:i2], Hinv[:, i1:i2, i1:i2], window, column_args, losses
        )
        W[:, :, i1:i2] = Q1
        W[:, :, i2:] -= torch.bmm(Err1, Hinv[:, i1:i2, i2:])
    if perm is not None:
        W = torch.gather(W, -1, torch.argsort(perm, dim=-1).unsqueeze(-2).expand(-1, num_rows, -1))
    return W.to(final_dtype), losses.sum(dim=1), used_rtn_fallback


def _activation_ordered(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, quant_args) -> tuple:
    """(W, H, perm, keep, g_idx): weights, Hessians and mask in the columns' quantization order, and the
    group of each column (None per-channel), as llm-compressor orders them."""
    from compressed_tensors.quantization import ActivationOrdering, QuantizationStrategy
    from llmcompressor.modifiers.gptq.helpers import apply_activation_ordering

    batch_size, num_rows, num_columns = W.shape
    device = W.device
    W, H, perm = apply_activation_ordering(W, H, quant_args.actorder)
    if perm is not None:
        keep = torch.gather(keep, -1, perm.unsqueeze(-2).expand(-1, num_rows, -1))
    g_idx = None
    if quant_args.strategy == QuantizationStrategy.GROUP:
        g_idx = torch.arange(num_columns, device=device, dtype=torch.int) // quant_args.group_size
        if quant_args.actorder == ActivationOrdering.WEIGHT:
            g_idx = torch.gather(g_idx.unsqueeze(0).expand(batch_size, -1), 1, perm)
    return W, H, perm, keep, g_idx


def _masked_block(W1, keep1, Hinv1, window, column_args, losses) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop over one block: (quantized columns, their scaled errors); adds to `losses` in place.

    A column's weights where `keep1` is False quantize to 0; each error updates the block's later columns.
    """
    from compressed_tensors.quantization import fake_quantize as ct_fake_quantize

    eff, zp = window
    Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
    for i in range(W1.shape[-1]):
        w = W1[:, :, i]
        q = ct_fake_quantize(
            w.transpose(0, 1),
            eff[:, :, i].transpose(0, 1),
            None if zp is None else zp[:, :, i].transpose(0, 1),
            column_args,
        ).transpose(0, 1)
        q = q * keep1[:, :, i]
        error = (w - q) / Hinv1[:, i, i][:, None]
        Q1[:, :, i], Err1[:, :, i] = q, error
        losses += error.square() / 2
        W1[:, :, i:] -= error.unsqueeze(-1) * Hinv1[:, i, i:].unsqueeze(1)
    return Q1, Err1


@contextlib.contextmanager
def _mask_aware_gptq():
    """GPTQModifier calls `quantize_weight` through its module's namespace: swap ours in for the block."""
    from llmcompressor.modifiers.gptq import base, gptq_quantize

    theirs = gptq_quantize.quantize_weight
    if base.quantize_weight is not theirs or list(inspect.signature(theirs).parameters) != list(
        inspect.signature(masked_quantize_weight).parameters
    ):
        raise RuntimeError(
            "llm-compressor's GPTQModifier no longer calls gptq_quantize.quantize_weight(weights, hessians, "
            "scale, zero_point, global_scale, quant_args, blocksize, percdamp): update masked_quantize_weight"
        )
    base.quantize_weight = masked_quantize_weight
    try:
        yield
    finally:
        base.quantize_weight = theirs


# ---- plumbing ----


def _config_groups(model, scheme: str) -> tuple[dict, list[str]]:
    """(config_groups, ignore) quantizing exactly the decoder linears with `scheme`.

    One config group per group size: a layer narrower than 128 inputs gets its own (group = its
    width); the real drafts (widths multiples of 128) get one group targeting every Linear.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    spec = scheme_spec(scheme)
    linears = decoder_linears(model)
    by_size: dict[int | None, list[str]] = {}
    for name, module in linears.items():
        size = None if spec["group_size"] is None else group_size(scheme, module.in_features)
        by_size.setdefault(size, []).append(name)
    groups = {}
    for i, (size, names) in enumerate(sorted(by_size.items(), key=lambda kv: kv[0] or 0)):
        args = QuantizationArgs(
            num_bits=spec["num_bits"], type="int", symmetric=True, strategy=spec["strategy"], group_size=size
        )
        targets = ["Linear"] if len(by_size) == 1 else names
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=args)
    # Every other Linear (lm_head) stays as it is.
    ignore = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in linears]
    return groups, ignore


def _run_oneshot(model, tokenizer, scheme: str, method: str, calib, seq_len: int | None) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups, ignore = _config_groups(model, scheme)
    if method == "gptq":
        modifier = GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=DAMPENING_FRAC)
        data = dict(
            dataset=calib,
            num_calibration_samples=len(calib),
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,  # the sample was already drawn with the seed
            batch_size=1,
        )
    else:
        modifier, data = QuantizationModifier(config_groups=groups, ignore=ignore), {}
    with _mask_aware_gptq() if method == "gptq" else contextlib.nullcontext():
        oneshot(model=model, recipe=modifier, processor=tokenizer, **data)


def _check_request(scheme: str, method: str, calibration) -> dict:
    """The scheme's format; raise naming the bad value where (scheme, method, calibration) cannot run."""
    spec = scheme_spec(scheme)
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} (known: {', '.join(METHODS)})")
    if method == "gptq" and calibration is None:
        raise ValueError("quantization method 'gptq' needs calibration data (calibration=None)")
    return spec


def _summary(scheme: str, method: str, spec: dict, model, before) -> dict:
    return {
        "quantization": scheme,
        "method": method,
        "algorithm": "mask-aware GPTQ (masked_quantize_weight)" if method == "gptq" else "round to nearest",
        "bits": spec["num_bits"],
        "strategy": spec["strategy"],
        "group_size": spec["group_size"],
        "layer_group_size": {n: group_size(scheme, m.in_features) for n, m in decoder_linears(model).items()},
        "zero_fraction_before": layer_sparsity(before),
    }


def _provenance(model_dir, calibration, scheme: str, method: str, settings: dict, calibration_format, seed: int):
    gptq = method == "gptq"
    return provenance(
        seed=seed,
        model=str(model_dir),
        calibration=None if calibration is None else str(calibration),
        quantization=scheme,
        method=method,
        calibration_samples=settings["calibration_samples"] if gptq else None,
        calibration_seq_len=settings["calibration_seq_len"] if gptq else None,
        calibration_format=calibration_format,
        dampening_frac=DAMPENING_FRAC if gptq else None,
    )


def quantize(
    model_dir,
    out_dir,
    *,
    scheme: str,
    method: str,
    calibration=None,
    settings: dict | None = None,
    seed: int,
    dtype="auto",
) -> dict:
    """Quantize the decoder linears of `model_dir` with `scheme` and save a compressed-tensors checkpoint.

    method: the config's quantize.algorithm (gptq or rtn).
    calibration: a datasets directory of prompt/response rows (as for prune), needed by gptq only.
    settings (gptq only): the config's quantize section (calibration_samples, calibration_seq_len) and
    its chat section under "chat" (see sd2.chat.data_format). GPTQ dampens with DAMPENING_FRAC.

    The checkpoint is checked before it appears under `out_dir`: loaded back and dequantized, every
    zero of the input is still zero. Returns the summary also stored in provenance.json.
    """
    spec = _check_request(scheme, method, calibration)
    settings = settings or {}
    torch.manual_seed(seed)
    start = time.time()

    tokenizer = load_tokenizer(model_dir)
    before = load_model(model_dir, dtype=dtype)
    model = load_model(model_dir, dtype=dtype)  # oneshot adds hooks and wraps save_pretrained: a throwaway copy

    calibration_format, calib, seq_len = None, None, None
    if method == "gptq":
        seq_len = settings["calibration_seq_len"]
        calib, calibration_format = calibration_set(
            calibration, tokenizer, settings["calibration_samples"], seq_len, seed, settings.get("chat")
        )
    _run_oneshot(model, tokenizer, scheme, method, calib, seq_len)

    summary = _summary(scheme, method, spec, model, before)
    info = _provenance(model_dir, calibration, scheme, method, settings, calibration_format, seed)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        del model
        loaded = load_quantized(tmp, dtype=torch_dtype(dtype))
        summary["rounded_to_zero"] = check_mask(before, loaded)
        summary["zero_fraction_after"] = layer_sparsity(loaded)
        summary["mask_kept"] = True
        summary["seconds"] = round(time.time() - start, 2)
        info.update(summary)
        write_json(tmp / "provenance.json", info)
    return summary
