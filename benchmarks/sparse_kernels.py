"""What unstructured sparsity buys on a CPU: one linear layer y = x W^T, dense torch against sparse kernels.

A draft decodes one token at a time (batch 1) and the target verifies k drafted tokens
plus one in a single pass (batch k + 1); both are matrix-vector-like products bound by
the bytes of weight they read. For every distinct linear shape of Llama-3.2-1B, -3B and
the config's drafts, at 0 / 50 / 70 / 90% unstructured sparsity (a magnitude mask on a
random normal weight, exactly round(s * numel) zeros, as sd2.masks.magnitude_mask),
in fp32 and bf16, on 1 and 2 torch threads, this times dense torch (`F.linear`, the zeros
in: how the sweep runs its drafts) and every sparse backend below, interleaved: each
repetition runs every backend once in a shuffled order, so machine noise hits them
alike; a backend's time is the median over repetitions. speed-up = dense / backend.

Weights that a real model could not keep in the last-level cache are timed cold: when a
model's decoder linears exceed the LLC (Llama-3.2-1B/3B), each backend cycles through
copies of its weight that add up to twice the LLC, so every call reads its weight from
memory as in decoding; the demo drafts fit in the LLC whole and are timed warm (`cold`
and `copies` columns). Inputs are made before the clock starts (x^T for the SpMM
backends, a 1-D vector for scipy and MKL at batch 1): only the kernel call is timed.

Backends (checked on PyPI, late 2026; which version, why in or out):
- torch_csr (torch 2.13): in. `W.to_sparse_csr()` (int64 indices) and `torch.sparse.mm`;
  on CPU this calls MKL's sparse BLAS (`addmm_out_sparse_csr_impl_mkl`): fp32 only, bf16
  raises NotImplementedError and is recorded as unsupported.
- torch_csr_i32: in. The same with int32 indices, what MKL's LP64 interface takes without
  a conversion and 4 bytes less per nonzero.
- torch_coo: in. `W.to_sparse()` (COO) and `torch.sparse.mm`: torch's only sparse layout
  with a bf16 matmul on CPU (its own kernel, not MKL).
- scipy (scipy 1.17.1, 2026; 1.18 needs Python >= 3.12): in. CSR matvec/matmat, fp32
  (numpy has no bf16), single-threaded whatever the thread setting.
- sparse_dot_mkl (0.9.10, 2025-10; MKL 2026.2 from the `mkl` wheel): in. The maintained
  Python wrapper of MKL's inspector-executor sparse BLAS (mkl_sparse_s_mv / _mm); fp32
  only (MKL's sparse BLAS has no bf16); threads set with mkl_set_num_threads.
- onnxruntime (1.32.0, 2026): in. The CPU contrib op com.microsoft.SparseToDenseMatMul
  (Eigen) on a CSR sparse-tensor input; fp32 only (no bf16 kernel registered).
- deepsparse (Neural Magic, 1.8.0): timed on the side, not maintained. End of life since
  June 2025: 1.9.0 is a source package whose install exits with an end-of-life message; the
  last wheels (1.8.0, 2024, cp311 x86-64) install and run on this AVX2 CPU but are built
  against numpy 1 (under numpy 2 their products are wrong, so the backend refuses to load)
  and pin onnx < 1.15: they cannot share this project's environment (numpy 2; datasets'
  pyarrow needs it). Timed in a throwaway venv of its own (below), fp32 only (its bf16 needs
  a CPU with native bf16). The engine compiles one ONNX MatMul per weight copy (W^T stored
  dense, the engine finds the zeros), one engine per batch and core count.
- intel-extension-for-pytorch (2.8.0, 2025-08): out. Built for torch 2.8 only (this project
  runs torch 2.13), retired by Intel, and has no unstructured sparse matmul.
- torch.sparse.to_sparse_semi_structured: out. 2:4 only and CUDA only ("Only CUDA tensors
  are currently supported" on CPU); torchao's sparsity is GPU-only as well.
- OpenVINO (2026.4): out. Its CPU sparse-weight decompression works for int8 weights on
  CPUs with AMX only (this AMD EPYC has AVX2, no AVX-512 or AMX).
- pydata `sparse`, `torch-sparse` (0.6.18, 2023, no wheels for torch 2.13), llama.cpp,
  CTranslate2: out. No CPU kernel for an unstructured sparse linear layer beyond the above.

scipy, sparse_dot_mkl, onnxruntime and deepsparse are optional: a backend whose package
does not import is recorded as "not installed". To time them, install them beside the
project (not into it) and point Python at them:

    pip install --no-deps --target /tmp/sd2-sparse-deps scipy==1.17.1 sparse-dot-mkl==0.9.10 \\
        onnxruntime==1.32.0 onnx==1.23.2 flatbuffers ml_dtypes mkl==2026.2.0 intel-openmp "tbb==2023.*"
    # pip --target leaves the mkl wheel's data/lib out: unpack it by hand
    pip download --no-deps mkl==2026.2.0 -d /tmp && \\
        unzip -j /tmp/mkl-2026.2.0-*.whl 'mkl-2026.2.0.data/data/lib/*' -d /tmp/sd2-sparse-deps/lib
    export LD_LIBRARY_PATH=/tmp/sd2-sparse-deps/lib MKL_THREADING_LAYER=GNU
    PYTHONPATH=/tmp/sd2-sparse-deps python benchmarks/sparse_kernels.py    # full run: 13 min on 2 cores
    python benchmarks/sparse_kernels.py --quick     # the config's drafts, 0 and 70%, 1 thread

    # deepsparse: a venv with numpy 1 that sees the project's packages after its own
    python3.11 -m venv /tmp/sd2-ds-venv && /tmp/sd2-ds-venv/bin/pip install deepsparse==1.8.0 "numpy<2" \\
        scipy==1.17.1 sparse-dot-mkl==0.9.10 onnxruntime==1.32.0
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/sd2-ds-venv/lib/python3.11/site-packages/zz_sd2.pth
    PYTHONPATH=. /tmp/sd2-ds-venv/bin/python benchmarks/sparse_kernels.py --backend deepsparse \\
        --model Llama-3.2-1B --dtypes fp32 --sparsities 0 0.5 0.7 \\
        --out results/tables/sparse_kernels_deepsparse.csv --figure results/figures/sparse_kernels_deepsparse

MKL_THREADING_LAYER=GNU makes the mkl wheel use the GNU OpenMP runtime that torch has
already loaded. Writes results/tables/sparse_kernels.csv (one row per shape, batch,
sparsity, dtype, threads and backend), its provenance in sparse_kernels.json beside it,
and results/figures/sparse_kernels.png/.pdf (speed-up of a whole decoder layer's linears
against sparsity, sd2.report.plots.plot_sparse_kernels).
"""

import argparse
import json
import math
import platform
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sd2 import config
from sd2.checkpoint import atomic_path
from sd2.hub import LLAMA_3_2
from sd2.provenance import provenance
from sd2.report.canvas import save_figure
from sd2.report.collect import write_table
from sd2.report.plots import plot_sparse_kernels, sparse_layer_speedups
from sd2.shapes import model_shape
from sd2.sweep_time import cpu_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = [
    "model",
    "shape_name",
    "count_per_layer",
    "out_features",
    "in_features",
    "batch",
    "sparsity",
    "dtype",
    "threads",
    "backend",
    "status",
    "median_us",
    "dense_median_us",
    "speedup",
    "reps",
    "calls_per_rep",
    "cold",
    "copies",
    "weight_bytes",
    "max_rel_err",
    "backend_version",
    "cpu",
    "torch_version",
]


# ---------------------------------------------------------------- shapes


def linear_shapes(spec: dict) -> list[tuple[str, int, int, int]]:
    """(shape_name, out_features, in_features, count per layer) of a Llama decoder layer's linears.

    Projections of one shape are timed once: q and o of Llama-3.2 (hidden x hidden) become
    "q_proj/o_proj" with count 2.
    """
    hidden, heads = spec["hidden_size"], spec["num_attention_heads"]
    head_dim = spec.get("head_dim") or hidden // heads
    kv = spec.get("num_key_value_heads") or heads
    inter = spec["intermediate_size"]
    projections = {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv * head_dim, hidden),
        "v_proj": (kv * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in projections.items():
        groups.setdefault(shape, []).append(name)
    return [("/".join(names), out_f, in_f, len(names)) for (out_f, in_f), names in groups.items()]


def model_specs(cfg: dict, names: list[str] | None) -> dict[str, dict]:
    """The hub models' shapes and the config's drafts (scratch models), by name."""
    specs = dict(LLAMA_3_2)
    for name in cfg["drafts"]:
        spec = cfg["models"][name]
        if "hidden_size" in spec:
            specs[name] = spec
        elif "layers_of" in spec:
            # A draft cut from a real model: its layers' sizes are the model's (config/real.yaml).
            specs[name] = {k: getattr(model_shape(name, cfg), k) for k in LLAMA_3_2["Llama-3.2-1B"]}
    if names is None:
        return specs
    unknown = [n for n in names if n not in specs and n not in cfg["models"]]
    if unknown:
        raise SystemExit(f"--model {unknown}: not one of {sorted(specs)} nor a model of the config")
    return {n: specs.get(n) or cfg["models"][n] for n in names}


def last_level_cache_bytes() -> int:
    """The largest CPU cache (L3 here), from sysfs; 32 MiB where sysfs does not say."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 * 1024**2)


def decoder_linear_bytes(spec: dict, elem_size: int) -> int:
    per_layer = sum(count * out_f * in_f for _, out_f, in_f, count in linear_shapes(spec))
    return per_layer * spec["num_hidden_layers"] * elem_size


def pruned_weights(out_f: int, in_f: int, sparsities: list[float], seed: int) -> dict[float, torch.Tensor]:
    """One random normal fp32 weight pruned to each sparsity: its round(s * numel) smallest |w| set to zero.

    The mask of sd2.masks.magnitude_mask (a stable sort of |w|, the first ones dropped; a
    test checks they agree), from one sort for every sparsity: sorting the 25M weights of a
    Llama-3.2-3B MLP matrix takes seconds. Importing sd2.drafts.prune would also import
    `datasets`, whose pyarrow needs numpy 2, which deepsparse's environment cannot have.
    """
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    order = weight.abs().flatten().argsort(stable=True)
    pruned = {}
    for sparsity in sparsities:
        flat = weight.flatten().clone()
        flat[order[: round(sparsity * weight.numel())]] = 0
        pruned[sparsity] = flat.view_as(weight)
    return pruned


# ---------------------------------------------------------------- backends
# Each backend turns a dense weight (out, in) into its own format once, copies that format for
# the cold cycle, and multiplies it by an input made before the clock starts. output() gives
# the result as a torch tensor (batch, out) for the correctness check.

# Largest |backend - fp32 reference| / max |reference| accepted: beyond it the run stops, since a wrong
# product's time means nothing (a wrong layout or an ABI mismatch gives ~1 or more). bf16 rounds inputs and
# outputs to 8 bits of mantissa, and torch's COO kernel also accumulates in bf16: up to ~0.2 of the largest
# value on the Llama shapes (dense bf16: ~0.004); the column max_rel_err records it.
TOLERANCE = {"fp32": 1e-3, "bf16": 0.5}


class Dense:
    name = "dense"

    def version(self):
        return torch.__version__

    def skip(self, dtype_name: str) -> str | None:
        """Why this backend is not timed in this dtype although it could be (None: it is timed)."""
        return None

    def convert(self, weight):
        return weight.contiguous()

    def copy(self, fmt):
        return fmt.clone()

    def nbytes(self, fmt):
        return fmt.numel() * fmt.element_size()

    def set_threads(self, threads):
        torch.set_num_threads(threads)

    def inputs(self, x):
        return x

    def call(self, fmt, inp):
        return F.linear(inp, fmt)

    def output(self, result, batch):
        return result

    def runner(self, fmts: list, inp):
        """A no-argument call that multiplies by the next copy of the weight each time, and the
        products one call makes (1). One pass over the copies first, so that their first touch is not
        timed (the first copy gets the correctness check's call)."""
        for fmt in fmts[1:]:
            self.call(fmt, inp)
        state = {"i": 0}

        def run():
            self.call(fmts[state["i"]], inp)
            state["i"] = (state["i"] + 1) % len(fmts)

        return run, 1


class TorchCSR(Dense):
    """torch.sparse.mm(W_csr, x^T): (out, batch); MKL's sparse BLAS on CPU."""

    name = "torch_csr"
    index_dtype = torch.int64

    def convert(self, weight):
        csr = weight.to_sparse_csr()
        if self.index_dtype == torch.int64:
            return csr
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(self.index_dtype),
            csr.col_indices().to(self.index_dtype),
            csr.values(),
            csr.shape,
            check_invariants=False,  # to_sparse_csr made them valid; only the index dtype changes
        )

    def nbytes(self, fmt):
        return sum(t.numel() * t.element_size() for t in (fmt.values(), fmt.crow_indices(), fmt.col_indices()))

    def inputs(self, x):
        return x.T.contiguous()

    def call(self, fmt, inp):
        return torch.sparse.mm(fmt, inp)

    def output(self, result, batch):
        return result.T


class TorchCSRInt32(TorchCSR):
    name = "torch_csr_i32"
    index_dtype = torch.int32


class TorchCOO(TorchCSR):
    name = "torch_coo"

    def skip(self, dtype_name):
        # 20-50x slower than dense in a probe on the Llama-3.2-1B shapes: timing it where CSR exists costs minutes.
        return (
            "skipped: fp32 goes through torch_csr (MKL); COO is timed as torch's only bf16 path"
            if (dtype_name == "fp32")
            else None
        )

    def convert(self, weight):
        return weight.to_sparse().coalesce()

    def nbytes(self, fmt):
        return sum(t.numel() * t.element_size() for t in (fmt.values(), fmt.indices()))


class Scipy(Dense):
    """scipy.sparse CSR (int32 indices) times a numpy vector or (in, batch) matrix."""

    name = "scipy"

    def __init__(self):
        import scipy
        import scipy.sparse

        self.module, self.sparse = scipy, scipy.sparse

    def version(self):
        return self.module.__version__

    def convert(self, weight):
        if weight.dtype != torch.float32:
            raise TypeError(f"scipy.sparse computes in numpy dtypes, which have no {weight.dtype}")
        return self.sparse.csr_array(weight.numpy())

    def copy(self, fmt):
        return fmt.copy()

    def nbytes(self, fmt):
        return fmt.data.nbytes + fmt.indices.nbytes + fmt.indptr.nbytes

    def set_threads(self, threads):
        torch.set_num_threads(threads)  # scipy's sparse products are single-threaded

    def inputs(self, x):
        return x[0].numpy() if x.shape[0] == 1 else x.T.contiguous().numpy()

    def call(self, fmt, inp):
        return fmt @ inp

    def output(self, result, batch):
        return torch.from_numpy(result).reshape(-1, batch).T


class SparseDotMKL(Scipy):
    """sparse_dot_mkl.dot_product_mkl: MKL's inspector-executor sparse BLAS on a scipy CSR matrix."""

    name = "sparse_dot_mkl"

    def __init__(self):
        super().__init__()
        import sparse_dot_mkl

        self.mkl = sparse_dot_mkl

    def version(self):
        return f"{self.mkl.__version__} (MKL {self.mkl.mkl_get_version_string()})"

    def convert(self, weight):
        if weight.dtype != torch.float32:
            raise TypeError(f"MKL's sparse BLAS computes in float32/float64 (and complex), not {weight.dtype}")
        return self.sparse.csr_matrix(weight.numpy())

    def set_threads(self, threads):
        torch.set_num_threads(threads)
        self.mkl.mkl_set_num_threads(threads)

    def call(self, fmt, inp):
        return self.mkl.dot_product_mkl(fmt, inp)


class OnnxRuntime(Dense):
    """onnxruntime's com.microsoft.SparseToDenseMatMul on a CSR sparse tensor (int64 indices) and x^T."""

    name = "onnxruntime"

    def __init__(self):
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        self.np, self.ort = np, ort
        graph = helper.make_graph(
            [helper.make_node("SparseToDenseMatMul", ["A", "B"], ["Y"], domain="com.microsoft")],
            "sparse_linear",
            [
                helper.make_sparse_tensor_value_info("A", TensorProto.FLOAT, ["out", "in"]),
                helper.make_tensor_value_info("B", TensorProto.FLOAT, ["in", "batch"]),
            ],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["out", "batch"])],
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        self.model = helper.make_model(graph, opset_imports=opsets, ir_version=onnx.IR_VERSION).SerializeToString()
        self.sessions = {}
        self.device = ort.OrtDevice.make("cpu", 0)

    def version(self):
        return self.ort.__version__

    def set_threads(self, threads):
        torch.set_num_threads(threads)
        if threads not in self.sessions:
            options = self.ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            # Its pool spins between runs by default: on 2 cores that starves the next backend's threads.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[threads] = self.ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])
        self.session = self.sessions[threads]

    def _value(self, shape, values, indices, indptr):
        tensor = self.ort.SparseTensor.sparse_csr_from_numpy(shape, values, indices, indptr, self.device)
        # The OrtValue may point into the numpy arrays: keep them alive with it.
        return self.ort.OrtValue.ort_value_from_sparse_tensor(tensor), (shape, values, indices, indptr)

    def convert(self, weight):
        if weight.dtype != torch.float32:
            raise TypeError(f"SparseToDenseMatMul has kernels for float32, float64 and ints, not {weight.dtype}")
        csr = weight.to_sparse_csr()
        return self._value(
            list(weight.shape), csr.values().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()
        )

    def copy(self, fmt):
        shape, *arrays = fmt[1]
        return self._value(shape, *(a.copy() for a in arrays))

    def nbytes(self, fmt):
        return sum(a.nbytes for a in fmt[1][1:])

    def inputs(self, x):
        return self.ort.OrtValue.ortvalue_from_numpy(x.T.contiguous().numpy())

    def call(self, fmt, inp):
        return self.session.run_with_ort_values(["Y"], {"A": fmt[0], "B": inp})

    def output(self, result, batch):
        return torch.from_numpy(result[0].numpy()).T


class DeepSparse(Dense):
    """Neural Magic's DeepSparse engine on an ONNX MatMul whose W^T is stored dense: the engine finds the
    zeros when it compiles. An engine is compiled for one batch size and core count, so one engine holds
    all the cold copies (one MatMul each, on the same input) and a call makes len(copies) products."""

    name = "deepsparse"

    def __init__(self):
        import numpy as np

        if int(np.__version__.split(".")[0]) >= 2:
            raise ImportError(
                f"deepsparse 1.8 is built against numpy 1; under numpy {np.__version__} its products are wrong"
            )
        import deepsparse
        import deepsparse.cpu
        import onnx

        self.np, self.deepsparse, self.onnx = np, deepsparse, onnx
        self.native_bf16 = deepsparse.cpu.cpu_architecture()["bf16"]
        self.dir = tempfile.TemporaryDirectory(prefix="sd2-deepsparse-")
        self.engine, self.engine_key, self.threads = None, None, 1

    def version(self):
        return f"{self.deepsparse.__version__} (end of life)"

    def convert(self, weight):
        if weight.dtype != torch.float32:
            raise TypeError(
                f"fp32 ONNX only: DeepSparse computes bf16 on CPUs with native bf16 (AVX512-BF16, AMX) only, "
                f"and deepsparse.cpu reports bf16={self.native_bf16} here"
            )
        self.engine, self.engine_key = None, None  # a new group: the last one's engine holds other weights
        return weight.T.contiguous().numpy()  # MatMul(x, W^T)

    def copy(self, fmt):
        return fmt.copy()

    def nbytes(self, fmt):
        return int(self.np.count_nonzero(fmt)) * 4  # its nonzero values: a lower bound of its (internal) layout

    def set_threads(self, threads):
        torch.set_num_threads(threads)
        self.threads = threads

    def inputs(self, x):
        return [x.contiguous().numpy()]

    def compiled(self, fmts: list, batch: int):
        key = (id(fmts[0]), len(fmts), batch, self.threads)
        if key != self.engine_key:
            from onnx import TensorProto, helper, numpy_helper

            in_f = fmts[0].shape[0]
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(len(fmts))],
                "sparse_linear",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, in_f])],
                [
                    helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [batch, f.shape[1]])
                    for i, f in enumerate(fmts)
                ],
                [numpy_helper.from_array(f, f"w{i}") for i, f in enumerate(fmts)],
            )
            path = Path(self.dir.name) / "linear.onnx"
            self.onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
            self.engine = None  # free the last engine before compiling the next
            self.engine = self.deepsparse.compile_model(str(path), batch_size=batch, num_cores=self.threads)
            self.engine_key = key
        return self.engine

    def runner(self, fmts, inp):
        engine = self.compiled(fmts, inp[0].shape[0])
        engine(inp)
        self.last = fmts
        return (lambda: engine(inp)), len(fmts)

    def call(self, fmt, inp):
        # The correctness check: the first output of the engine runner() compiled, whose first copy is fmt.
        fmts = self.last if getattr(self, "last", [None])[0] is fmt else [fmt]
        return self.compiled(fmts, inp[0].shape[0])(inp)[0]

    def output(self, result, batch):
        return torch.from_numpy(result)


BACKENDS = (Dense, TorchCSR, TorchCSRInt32, TorchCOO, Scipy, SparseDotMKL, OnnxRuntime, DeepSparse)


def load_backends(names: list[str] | None) -> tuple[list, dict[str, str]]:
    """The backends to time, and for each one that does not import, why."""
    chosen = [b for b in BACKENDS if names is None or b.name in names or b is Dense]
    ready, missing = [], {}
    for backend in chosen:
        try:
            ready.append(backend())
        except ImportError as err:
            missing[backend.name] = f"not installed: {err}"
    return ready, missing


# ---------------------------------------------------------------- timing


def time_interleaved(runs: dict, reps: int, min_seconds: float, rng: random.Random) -> tuple[dict, dict]:
    """Median seconds per product of each (run, products per call), and its calls per repetition.

    A backend's repetition is `calls` back-to-back calls, enough that all its repetitions
    together last >= min_seconds; each repetition runs every backend once, in a new random
    order, so slow drifts of the machine land on all of them.
    """
    per_call = {}
    for name, (run, _) in runs.items():
        # One call to size the repetitions; the caller's correctness check already warmed each backend up.
        start = time.perf_counter()
        run()
        per_call[name] = time.perf_counter() - start
    calls = {name: max(1, math.ceil(min_seconds / (reps * t))) for name, t in per_call.items()}
    samples = {name: [] for name in runs}
    order = list(runs)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            (run, products), n = runs[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                run()
            samples[name].append((time.perf_counter() - start) / (n * products))
    return {name: statistics.median(s) for name, s in samples.items()}, calls


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def unsupported(err: Exception, dtype_name: str) -> str:
    if dtype_name == "fp32":  # every backend claims fp32: a failure there is a bug, not a missing kernel
        raise err
    return f"unsupported: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def _formats(backends, weight, dtype_name: str, cold: bool, evict_bytes: int) -> tuple[dict, dict]:
    """(each backend's copies of `weight` in its layout, enough to evict the caches when `cold`; the status
    of every backend that skips this dtype or cannot convert it)."""
    fmts, status = {}, {}
    for backend in backends:
        if backend.skip(dtype_name):
            status[backend.name] = backend.skip(dtype_name)
            continue
        try:
            fmt = backend.convert(weight)
        except (NotImplementedError, RuntimeError, TypeError) as err:
            status[backend.name] = unsupported(err, dtype_name)
            continue
        copies = max(1, math.ceil(evict_bytes / max(1, backend.nbytes(fmt)))) if cold else 1
        fmts[backend.name] = [fmt] + [backend.copy(fmt) for _ in range(copies - 1)]
    return fmts, status


def _checked_runs(backends, fmts, status, x, reference, dtype_name: str, threads: int) -> tuple[dict, dict]:
    """(a runner per backend that computes the product, its relative error against `reference`). A backend
    that fails here is dropped from `fmts` with its reason in `status`; a wrong product stops the run."""
    batch = x.shape[0]
    runs, errors = {}, {}
    for backend in backends:
        name = backend.name
        if name not in fmts:
            continue
        # Thread settings are global per library: each backend sets its own before its runner.
        backend.set_threads(threads)
        inp = backend.inputs(x)
        try:
            runs[name] = backend.runner(fmts[name], inp)
            got = backend.output(backend.call(fmts[name][0], inp), batch)
        except (NotImplementedError, RuntimeError, TypeError) as err:  # e.g. MKL's CSR kernel in bf16
            status[name] = unsupported(err, dtype_name)
            del fmts[name]
            runs.pop(name, None)
            continue
        errors[name] = relative_error(got, reference)
        if not errors[name] <= TOLERANCE[dtype_name]:
            raise RuntimeError(
                f"{name}, {dtype_name}, batch {batch}, {threads} threads: the product differs from the "
                f"dense fp32 one by {errors[name]:.3g} of its largest value (tolerance {TOLERANCE[dtype_name]})"
            )
    return runs, errors


def measure_group(backends, weight, dtype_name, cold, evict_bytes, thread_counts, batches, args, rng, seed):
    """Rows for one (shape, sparsity, dtype): every backend x threads x batch, timed side by side."""
    weight = weight.to(DTYPES[dtype_name])
    fmts, status = _formats(backends, weight, dtype_name, cold, evict_bytes)
    results = []
    for threads in thread_counts:
        for batch in batches:
            x = torch.randn(batch, weight.shape[1], generator=torch.Generator().manual_seed(seed + batch))
            x = x.to(weight.dtype)
            reference = x.float() @ weight.float().T
            runs, errors = _checked_runs(backends, fmts, status, x, reference, dtype_name, threads)
            seconds, calls = time_interleaved(runs, args.reps, args.min_seconds, rng)
            for backend in backends:
                name = backend.name
                row = {
                    "batch": batch,
                    "dtype": dtype_name,
                    "threads": threads,
                    "backend": name,
                    "backend_version": backend.version(),
                    "cold": cold,
                }
                if name in seconds:
                    row.update(
                        status="ok",
                        median_us=round(seconds[name] * 1e6, 2),
                        dense_median_us=round(seconds["dense"] * 1e6, 2),
                        speedup=round(seconds["dense"] / seconds[name], 4),
                        reps=args.reps,
                        calls_per_rep=calls[name],
                        copies=len(fmts[name]),
                        weight_bytes=backend.nbytes(fmts[name][0]),
                        max_rel_err=float(f"{errors[name]:.3g}"),
                    )
                else:
                    row["status"] = status[name]
                results.append(row)
    return results


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/config.yaml", help="its drafts' shapes are timed too")
    parser.add_argument(
        "--model", action="append", help="Llama-3.2-1B, Llama-3.2-3B or a draft of the config (default: all)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 6], help="1: drafting; k + 1: verification")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backend", action="append", help=f"one of {[b.name for b in BACKENDS]} (default: all)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per cell (medians over them)")
    parser.add_argument("--min-seconds", type=float, default=0.2, help="timed seconds per backend and cell, at least")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: the config's drafts only, 0 and 70%%, 1 thread, few reps"
    )
    parser.add_argument("--out", default="results/tables/sparse_kernels.csv")
    parser.add_argument("--figure", default="results/figures/sparse_kernels", help="stem of the .png and .pdf")
    args = parser.parse_args(argv)
    if args.quick:
        args.sparsities, args.threads, args.reps, args.min_seconds = [0.0, 0.7], [1], 3, 0.01
    if args.reps < 1 or any(not 0 <= s < 1 for s in args.sparsities) or min(args.batches) < 1:
        parser.error("--reps and --batches must be >= 1 and every --sparsities value in [0, 1)")
    return args


def measure_all(groups, backends, missing: dict, llc: int, evict_bytes: int, rng, args) -> list[dict]:
    """Rows of every (model, shape, sparsity, dtype) group, a not-installed backend's included as skipped."""
    rows, weights = [], {}
    for model, spec, (shape_name, out_f, in_f, count), sparsity, dtype_name in tqdm(groups, mininterval=5):
        if (out_f, in_f) not in weights:  # every sparsity of a shape from one sort; bf16 keeps every zero
            weights = {(out_f, in_f): pruned_weights(out_f, in_f, args.sparsities, args.seed)}
        cold = decoder_linear_bytes(spec, DTYPES[dtype_name].itemsize) > llc
        measured = measure_group(
            backends,
            weights[out_f, in_f][sparsity],
            dtype_name,
            cold,
            evict_bytes,
            args.threads,
            args.batches,
            args,
            rng,
            args.seed,
        )
        skipped = [
            {"batch": b, "dtype": dtype_name, "threads": t, "backend": name, "status": why}
            for name, why in missing.items()
            for t in args.threads
            for b in args.batches
        ]
        for row in measured + skipped:
            row.update(
                model=model,
                shape_name=shape_name,
                count_per_layer=count,
                out_features=out_f,
                in_features=in_f,
                sparsity=round(sparsity * 100),
                cpu=cpu_model(),
                torch_version=torch.__version__,
            )
            rows.append(row)
    return rows


def print_layer_speedups(table: pd.DataFrame) -> None:
    layer = sparse_layer_speedups(table)
    if len(layer):
        print("\nspeed-up of a decoder layer's linears (dense time / backend time, summed over q,k,v,o,gate,up,down):")
        wide = layer.pivot_table(
            index=["model", "batch", "dtype", "threads", "backend"], columns="sparsity", values="speedup"
        )
        print(wide.round(2).to_string())


def main(argv=None):
    args = parse_args(argv)
    cfg = config.load(args.config)
    names = args.model or ([n for n in cfg["drafts"] if "hidden_size" in cfg["models"][n]] if args.quick else None)
    specs = model_specs(cfg, names)
    backends, missing = load_backends(args.backend)
    llc = last_level_cache_bytes()
    # Twice the LLC of distinct weight bytes per backend, cycled: no call finds its weight in cache.
    evict_bytes = 2 * llc
    rng = random.Random(args.seed)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    groups = [
        (model, spec, shape, sparsity, dtype_name)
        for model, spec in specs.items()
        for shape in linear_shapes(spec)
        for sparsity in args.sparsities
        for dtype_name in args.dtypes
    ]
    print(
        f"{len(groups)} (shape, sparsity, dtype) groups x threads {args.threads} x batches {args.batches}; "
        f"backends {[b.name for b in backends]}; not installed: {sorted(missing) or 'none'}; LLC {llc / 2**20:.0f} MiB"
    )
    started = time.perf_counter()
    rows = measure_all(groups, backends, missing, llc, evict_bytes, rng, args)
    seconds = time.perf_counter() - started
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    # Unsupported rows have no counts: nullable integers keep the others from printing as floats.
    table = table.astype({c: "Int64" for c in ("reps", "calls_per_rep", "copies", "weight_bytes")})
    write_table(table, args.out)
    meta = provenance(
        seed=args.seed,
        **{k: v for k, v in vars(args).items() if k != "seed"},
        models={name: {k: spec[k] for k in LLAMA_3_2["Llama-3.2-1B"] if k in spec} for name, spec in specs.items()},
        backends={b.name: b.version() for b in backends},
        not_installed=missing,
        cpu=cpu_model(),
        machine=platform.machine(),
        last_level_cache_bytes=llc,
        cold_cycle_bytes=evict_bytes,
        seconds=round(seconds, 1),
    )
    with atomic_path(Path(args.out).with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    paths = save_figure(plot_sparse_kernels(table), Path(args.figure).parent, Path(args.figure).name)
    print(f"{len(table)} rows in {seconds:.0f} s -> {args.out}, {', '.join(map(str, paths))}")
    print_layer_speedups(table)


if __name__ == "__main__":
    main()
