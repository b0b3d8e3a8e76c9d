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


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def sparse_layers(model: nn.Module, min_sparsity: float = MIN_SPARSITY) -> list[str]:
    """Names of the nn.Linear modules with at least min_sparsity of their weights zero."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and zero_fraction(module.weight) >= min_sparsity
    ]


def csr_modules(model: nn.Module, min_sparsity: float = MIN_SPARSITY) -> dict[str, CSRLinear]:
    """A CSRLinear for every linear of `model` with at least min_sparsity zeros, by module name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return {name: CSRLinear(model.get_submodule(name)) for name in sparse_layers(model, min_sparsity)}


def swap(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put `modules` into `model` by name; returns the modules they replaced."""
    replaced = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        model.set_submodule(name, module)
    return replaced


def check_runs_csr(model: nn.Module) -> None:
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(
            f"draft kernel 'csr' runs fp32 on a CPU only (MKL's sparse BLAS); this draft is "
            f"{weight.dtype} on {weight.device}: load it with draft_dtype float32 on the CPU, or use 'dense'"
        )


@contextlib.contextmanager
def draft_kernel(model: nn.Module, kernel: str, min_sparsity: float = MIN_SPARSITY):
    """Inside the block, `model` runs its sparse linears with `kernel`; yields the converted layers' names.

    "dense" changes nothing. "csr" swaps every linear of at least min_sparsity zeros for a
    CSRLinear and puts the originals back on exit, so the model leaves the block as it came.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown draft kernel {kernel!r}; choose one of {list(KERNELS)}")
    if kernel == "dense":
        yield []
        return
    check_runs_csr(model)
    originals = swap(model, csr_modules(model, min_sparsity))
    try:
        yield list(originals)
    finally:
        swap(model, originals)
