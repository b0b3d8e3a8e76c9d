"""A pruned draft's linear layers run as sparse matrices on a CPU: torch CSR with int32 indices.

Why this kernel and where it pays (benchmarks/sparse_kernels.py, results/tables/sparse_kernels.csv):
it is the one sparse kernel that ships with torch; with int32 indices torch hands the product
to MKL's sparse BLAS without converting them. At batch 1 (drafting), fp32, 2 threads, it beats
dense torch on a Llama-3.2-1B/3B decoder layer at 70% sparsity and loses at 50%, on 1 thread,
on the demo drafts' small layers, and in bf16 (MKL's sparse BLAS has no bf16). So only layers
at least `MIN_SPARSITY` zeros are converted, fp32 on a CPU only, and whether the whole draft
gains is measured end to end (benchmarks/sparse_decoding.py), not assumed.

The values are the same weights: outputs agree with dense torch to float rounding (summation
order differs), which can flip a greedy near-tie; measure's step-by-step cross-check of the
timed runs against the dense teacher-forced walk counts such flips (`draft_near_ties`).
"""

import contextlib
import warnings

import torch
from torch import nn

from sd2.models import layer_sparsity

KERNELS = ("dense", "csr")
# Below this fraction of zeros a CSR layer is slower than dense at the benchmark's real shapes.
MIN_SPARSITY = 0.6


class CSRLinear(nn.Module):
    """y = x W^T + b with W stored as CSR (int32 indices); W's zeros are neither stored nor read."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        csr = linear.weight.detach().to_sparse_csr()
        self.weight = torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32),
            csr.col_indices().to(torch.int32),
            csr.values(),
            csr.shape,
            check_invariants=False,  # to_sparse_csr made them valid; only the index dtype changes
        )
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.T.contiguous()).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def sparse_layers(model: nn.Module, min_sparsity: float = MIN_SPARSITY) -> list[str]:
    """Names of the decoder linears with at least min_sparsity of their weights zero (lm_head is never pruned)."""
    return [name for name, zeros in layer_sparsity(model).items() if zeros >= min_sparsity]


def kernel_modules(model: nn.Module, kernel: str, min_sparsity: float = MIN_SPARSITY) -> dict[str, nn.Module]:
    """What running `model` with `kernel` swaps in, by module name: nothing for "dense", a CSRLinear per
    sparse layer for "csr". Built once, before any timed run; refuses what the kernel cannot run."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown draft kernel {kernel!r}; choose one of {list(KERNELS)}")
    if kernel == "dense":
        return {}
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(
            f"draft kernel 'csr' runs fp32 on a CPU only (MKL's sparse BLAS); this draft is "
            f"{weight.dtype} on {weight.device}: load it with draft_dtype float32 on the CPU, or use 'dense'"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return {name: CSRLinear(model.get_submodule(name)) for name in sparse_layers(model, min_sparsity)}


def swap(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put `modules` into `model` by name; returns the modules they replaced."""
    replaced = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        model.set_submodule(name, module)
    return replaced


@contextlib.contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module]):
    """Inside the block `model` runs with `modules` (from kernel_modules); it leaves as it came."""
    originals = swap(model, modules)
    try:
        yield
    finally:
        swap(model, originals)
