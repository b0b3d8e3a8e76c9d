"""Training precision: bf16 autocast only where the device runs bf16 natively.

On a CPU without native bf16 (AVX2 only: many AMD and older Intel parts, most laptops
and CI runners) PyTorch emulates bf16 matmuls, and the default target trains about 33x
slower than in fp32 (benchmarks/precision.py measures it on the machine at hand).
"""

import warnings

import torch


def native_bf16(device_type: str) -> bool:
    """Whether `device_type` ("cpu" or "cuda") runs bf16 matmuls in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        # oneDNN's own check: AVX512-BF16 or AMX (what its bf16 kernels need).
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_bf16(setting, device_type: str) -> tuple[bool, str]:
    """(use bf16 autocast?, why) for the config value `setting`: "auto", true or false."""
    if setting not in ("auto", True, False):
        raise ValueError(f"bf16 must be 'auto', true or false, got {setting!r}")
    native = native_bf16(device_type)
    where = f"{device_type} {'has' if native else 'has no'} native bf16"
    if setting == "auto":
        return native, f"bf16 auto -> {'bf16' if native else 'fp32'} ({where})"
    if setting and not native:
        warnings.warn(
            f"bf16: true on a {device_type} without native bf16: autocast is emulated and training "
            "may run 30x slower than fp32; set bf16: auto or false",
            stacklevel=2,
        )
    return bool(setting), f"bf16 {str(setting).lower()} (set in the config; {where})"


def precision_name(bf16: bool) -> str:
    return "bf16-autocast" if bf16 else "fp32"
