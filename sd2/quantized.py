"""Quantized checkpoints: the weight schemes, and a compressed-tensors checkpoint loaded back dequantized.

sd2.drafts.quantize writes such checkpoints; sd2.models loads them and sd2.measure.weight_bytes
counts their bytes, so what all three share lives here, below them.

Schemes (ours -> the weights' format; activations stay 16-bit):
  w8a16: int8, symmetric, one scale per output row (per-channel). The "W8A16" preset of
         compressed-tensors 0.19 is per-group (128); per-channel is what we want here: no group
         overhead, and int8 loses little anyway. vLLM runs both through its WNA16 (Marlin) kernels.
  w4a16: int4, symmetric, one scale per group of 128 consecutive inputs (the "W4A16" preset), or of
         the whole row where a layer is narrower than 128 (the tiny test drafts).
"none" means no quantization.
"""

import json
import warnings
from pathlib import Path

import torch

from sd2 import variants

# Our scheme names -> the weights' quantization (llm-compressor's preset it follows, for the record).
SCHEMES = {
    "w8a16": {"preset": "W8A16", "num_bits": 8, "strategy": "channel", "group_size": None},
    "w4a16": {"preset": "W4A16", "num_bits": 4, "strategy": "group", "group_size": 128},
}
# compressed-tensors' quantization parameters on a module; stripped once the weights are dequantized.
QPARAM_SUFFIXES = ("_scale", "_zero_point", "_shape", "_global_scale", "_g_idx")


def scheme_spec(scheme: str) -> dict:
    """The weights' format of a scheme; a quantization-aware one ('w4a16-qat') stores its base scheme's."""
    if scheme == "none":
        raise ValueError("quantization 'none' means the draft is not quantized: there is nothing to run")
    if variants.base_scheme(scheme) not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)}, or none)")
    return SCHEMES[variants.base_scheme(scheme)]


def group_size(scheme: str, in_features: int) -> int:
    """Inputs sharing one scale in a layer with `in_features` inputs (per-channel: all of them).

    The scheme's group (128), or where it does not divide the layer's inputs, the largest group
    below it that does (a demo draft's 176 inputs: 88): vLLM's kernels take groups of 32, 64 and
    128, which every real draft's widths (multiples of 128) get; the demo drafts are not served.
    """
    spec = scheme_spec(scheme)
    if spec["group_size"] is None:
        return in_features
    return max(d for d in range(1, min(spec["group_size"], in_features) + 1) if in_features % d == 0)


def weight_bits(scheme: str, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int | None]:
    """(bits per weight, bits per scale, inputs per scale; None: one scale per output row).

    Scales are stored in the checkpoint's dtype (bf16 for the real drafts, fp32 for fp32 ones); a
    symmetric scheme stores no zero point. A w4a16 layer narrower than 128 inputs has one group per row.
    """
    spec = scheme_spec(scheme)
    return spec["num_bits"], torch.finfo(scale_dtype).bits, spec["group_size"]


def is_quantized(path) -> bool:
    """A local checkpoint saved by sd2.drafts.quantize (compressed-tensors quantization_config)."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    quantization = json.loads(config.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method") == "compressed-tensors"


def load_quantized(path, dtype: torch.dtype | str = "auto", device: str = "cpu"):
    """A compressed-tensors checkpoint as a plain model whose decoder weights are the dequantized values.

    dtype: a torch.dtype, or "auto" for the stored one (sd2.models.load_model takes config names).
    transformers decompresses at load time (CompressedTensorsConfig(dequantize=True), on the CPU too);
    the scales and compressed-tensors' bookkeeping are then removed, so the model has exactly the
    parameters of the unquantized one (parameter counts, MACs and state dicts compare directly).
    sd2.models.load_model loads such a checkpoint through here.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if not is_quantized(path):
        raise ValueError(f"{path}: not a compressed-tensors checkpoint (no quantization_config); use load_model")
    with warnings.catch_warnings():
        # Passing a config to a quantized checkpoint warns that only its loading flags are used: as intended.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    _clear_quantization(model)
    leftover = [n for n, _ in model.named_parameters() if n.endswith(tuple(f"weight{s}" for s in QPARAM_SUFFIXES))]
    if leftover:
        raise RuntimeError(f"{path}: quantization parameters left after dequantizing: {leftover[:5]}")
    return model.to(device).eval()


def _clear_quantization(model) -> None:
    """Remove compressed-tensors' scales and status attributes from every quantized module."""
    from compressed_tensors.quantization import QuantizationMetadata

    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            QuantizationMetadata.clear_quantization(module)
            for attr in ("quantization_status", "quantization_enabled"):
                if hasattr(module, attr):
                    delattr(module, attr)
