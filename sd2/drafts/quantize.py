"""Rule quantize: weight-only quantization of a (sparse) draft's decoder linears, saved for vLLM.

Schemes (ours -> the weights' format; activations stay 16-bit):
  w8a16: int8, symmetric, one scale per output row (per-channel). llm-compressor's own "W8A16"
         preset is per-group (128) in 0.14; per-channel is what we want here: no group overhead and
         int8 loses little anyway. vLLM runs both through its WNA16 (Marlin) kernels.
  w4a16: int4, symmetric, one scale per group of 128 consecutive inputs (the "W4A16" preset), or of
         the whole row where a layer is narrower than 128 (the tiny test drafts).
"none" means no quantization: the workflow skips this step, `quantize` refuses it.

Only the nn.Linear layers inside the decoder blocks are quantized (sd2.models.decoder_linears: q, k,
v, o, gate, up, down); embeddings and lm_head stay as they are, as in prune.py.

Methods: "rtn" (round to nearest, llm-compressor's QuantizationModifier, no data) or "gptq"
(GPTQModifier, Hessians from calibration prompts). Both run inside llm-compressor's `oneshot()` on a
throwaway copy of the model, which is then saved with `save_compressed=True`: the weights as packed
integers ("pack-quantized") plus scales, and a `quantization_config` with
`quant_method: compressed-tensors` in config.json, the format vLLM loads.

The sparsity mask: round to nearest keeps zeros (0 / scale rounds to 0, and a symmetric scheme has
no zero point). GPTQ does not: its error feedback adds a correction to every not-yet-quantized
column, zeros included, so most of a pruned layer's zeros come out non-zero (llm-compressor 0.14
has no mask option for GPTQ; its sparsity-aware compressors were removed, see below). So after
GPTQ the mask is applied again: the stored weight is mask * Q(W), still exactly representable
(0 is the integer 0 under a symmetric scheme) and still on the same scales. `check_mask` verifies
on the saved checkpoint, loaded back, that every zero of the input is a zero of the output
(rounding may add zeros: small weights round to 0, those are counted, not an error).

Sparse + quantized storage: compressed-tensors 0.19 dropped its sparse compressors (bitmask,
2:4, marlin-24 are "legacy formats", its ModelCompressor writes `sparsity_config: {}`) and vLLM
removed its sparse kernels, so the checkpoint stores the zeros as quantized zeros; the bytes a
bitmask/CSR layout would save are counted analytically (rule-side, from the mask), not stored.
"""

import time
import warnings

import torch

from sd2.checkpoint import atomic_path, write_json
from sd2.models import decoder_linears, load_model, load_tokenizer, torch_dtype
from sd2.provenance import provenance

# Our scheme names -> the weights' quantization (llm-compressor's preset it follows, for the record).
SCHEMES = {
    "w8a16": {"preset": "W8A16", "num_bits": 8, "strategy": "channel", "group_size": None},
    "w4a16": {"preset": "W4A16", "num_bits": 4, "strategy": "group", "group_size": 128},
}
METHODS = ("gptq", "rtn")
# compressed-tensors' quantization parameters on a module; stripped once the weights are dequantized.
QPARAM_SUFFIXES = ("_scale", "_zero_point", "_shape", "_global_scale", "_g_idx")


def scheme_spec(scheme: str) -> dict:
    if scheme == "none":
        raise ValueError("quantization 'none' means the draft is not quantized: there is nothing to run")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)}, or none)")
    return SCHEMES[scheme]


def group_size(scheme: str, in_features: int, layer: str = "weight") -> int:
    """Inputs sharing one scale in a layer with `in_features` inputs (per-channel: all of them)."""
    spec = scheme_spec(scheme)
    if spec["group_size"] is None:
        return in_features
    size = min(spec["group_size"], in_features)
    if in_features % size:
        raise ValueError(f"{layer}: {in_features} inputs are not a multiple of {scheme}'s group size {size}")
    return size


def weight_bits(scheme: str, scale_dtype=torch.bfloat16) -> tuple[int, int, int | None]:
    """(bits per weight, bits per scale, inputs per scale; None: one scale per output row).

    Scales are stored in the checkpoint's dtype (bf16 for the real drafts, fp32 for fp32 ones); a
    symmetric scheme stores no zero point. A w4a16 layer narrower than 128 inputs has one group per row.
    """
    spec = scheme_spec(scheme)
    return spec["num_bits"], torch.finfo(torch_dtype(scale_dtype)).bits, spec["group_size"]


def quantized_weight_bytes(
    out_features: int, in_features: int, scheme: str, scale_dtype=torch.bfloat16, layer: str = "weight"
) -> float:
    """Bytes of one quantized linear's weight as stored: packed integers plus one scale per group."""
    bits, scale_bits, _ = weight_bits(scheme, scale_dtype)
    groups = out_features * (in_features // group_size(scheme, in_features, layer))
    return (out_features * in_features * bits + groups * scale_bits) / 8


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
    half_range = torch.tensor(q_max - q_min, dtype=w.dtype) / 2
    scale = w.abs().amax(dim=-1, keepdim=True) / half_range
    # An all-zero group: compressed-tensors replaces the zero scale with the dtype's eps (0 stays 0).
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype), scale)
    q = torch.round(torch.clamp(w / scale, q_min, q_max)) * scale
    # q + (w - w.detach()): exactly q in the forward pass, the identity's gradient in the backward.
    return q.flatten(-2) + (weight - weight.detach())


# ---- the mask ----


def zero_fractions(model) -> dict[str, float]:
    return {n: (m.weight == 0).sum().item() / m.weight.numel() for n, m in decoder_linears(model).items()}


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
        size = None if spec["group_size"] is None else group_size(scheme, module.in_features, name)
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


def _run_oneshot(model, tokenizer, scheme: str, method: str, calib, seq_len: int, dampening_frac: float) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups, ignore = _config_groups(model, scheme)
    if method == "gptq":
        modifier = GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=dampening_frac)
        data = dict(
            dataset=calib,
            num_calibration_samples=len(calib),
            max_seq_length=seq_len,
            shuffle_calibration_samples=False,  # the sample was already drawn with the seed
            batch_size=1,
        )
    else:
        modifier, data = QuantizationModifier(config_groups=groups, ignore=ignore), {}
    oneshot(model=model, recipe=modifier, processor=tokenizer, **data)


def quantize(
    model_dir,
    out_dir,
    *,
    scheme: str,
    method: str = "gptq",
    calibration=None,
    settings: dict | None = None,
    seed: int,
    dtype="auto",
) -> dict:
    """Quantize the decoder linears of `model_dir` with `scheme` and save a compressed-tensors checkpoint.

    calibration: a datasets directory of prompt/response rows (as for prune), needed by gptq only.
    settings (gptq only): calibration_samples, calibration_seq_len, optional dampening_frac (default
    0.01, llm-compressor's) and chat (see sd2.chat.data_format).

    The checkpoint is checked before it appears under `out_dir`: loaded back and dequantized, every
    zero of the input is still zero. Returns the summary also stored in provenance.json.
    """
    from sd2.drafts.prune import calibration_set

    spec = scheme_spec(scheme)
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r} (known: {', '.join(METHODS)})")
    settings = settings or {}
    if method == "gptq" and calibration is None:
        raise ValueError("quantization method 'gptq' needs calibration data (calibration=None)")
    torch.manual_seed(seed)
    start = time.time()

    tokenizer = load_tokenizer(model_dir)
    before = load_model(model_dir, dtype=dtype)
    model = load_model(model_dir, dtype=dtype)  # oneshot adds hooks and wraps save_pretrained: a throwaway copy
    mask = {n: m.weight == 0 for n, m in decoder_linears(before).items()}

    calibration_format, calib, seq_len = None, None, None
    if method == "gptq":
        seq_len = settings["calibration_seq_len"]
        calib, calibration_format = calibration_set(
            calibration, tokenizer, settings["calibration_samples"], seq_len, seed, settings.get("chat")
        )
    _run_oneshot(model, tokenizer, scheme, method, calib, seq_len, settings.get("dampening_frac", 0.01))

    # GPTQ's error feedback made pruned weights non-zero: put the mask back (see the module docstring).
    unmasked = {}
    with torch.no_grad():
        for name, module in decoder_linears(model).items():
            lost = int((mask[name] & (module.weight != 0)).sum())
            if lost:
                unmasked[name] = lost
                module.weight.masked_fill_(mask[name].to(module.weight.device), 0)
    if unmasked:
        print(
            f"quantize: {method} made {sum(unmasked.values())} pruned weight(s) non-zero in {len(unmasked)} "
            "layer(s); masked again (provenance: remasked)"
        )

    summary = {
        "quantization": scheme,
        "method": method,
        "bits": spec["num_bits"],
        "strategy": spec["strategy"],
        "group_size": spec["group_size"],
        "layer_group_size": {n: group_size(scheme, m.in_features, n) for n, m in decoder_linears(model).items()},
        "zero_fraction_before": zero_fractions(before),
        "remasked": unmasked,
    }
    info = provenance(
        seed=seed,
        model=str(model_dir),
        calibration=None if calibration is None else str(calibration),
        quantization=scheme,
        method=method,
        calibration_samples=settings.get("calibration_samples") if method == "gptq" else None,
        calibration_seq_len=seq_len,
        calibration_format=calibration_format,
        dampening_frac=settings.get("dampening_frac", 0.01) if method == "gptq" else None,
    )
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        del model
        loaded = load_quantized(tmp, dtype=dtype)
        summary["rounded_to_zero"] = check_mask(before, loaded)
        summary["zero_fraction_after"] = zero_fractions(loaded)
        summary["mask_kept"] = True
        summary["seconds"] = round(time.time() - start, 2)
        info.update(summary)
        write_json(tmp / "provenance.json", info)
    return summary


def load_quantized(path, dtype="auto", device: str = "cpu"):
    """A compressed-tensors checkpoint as a plain model whose decoder weights are the dequantized values.

    transformers decompresses at load time (CompressedTensorsConfig(dequantize=True), on the CPU too);
    the scales and compressed-tensors' bookkeeping are then removed, so the model has exactly the
    parameters of the unquantized one (parameter counts, MACs and state dicts compare directly).
    sd2.models.load_model also works on such a checkpoint: it loads the packed integers and decompresses
    them on the first forward pass, keeping the scales as extra parameters.
    """
    from compressed_tensors.quantization import QuantizationMetadata
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():
        # Passing a config to a quantized checkpoint warns that only its loading flags are used: as intended.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype(dtype), quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            QuantizationMetadata.clear_quantization(module)
            for attr in ("quantization_status", "quantization_enabled"):
                if hasattr(module, attr):
                    delattr(module, attr)
    leftover = [n for n, _ in model.named_parameters() if n.endswith(tuple(f"weight{s}" for s in QPARAM_SUFFIXES))]
    if leftover:
        raise RuntimeError(f"{path}: quantization parameters left after dequantizing: {leftover[:5]}")
    return model.to(device).eval()
