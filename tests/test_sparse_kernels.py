"""benchmarks/sparse_kernels.py: shapes, exact sparsity, every backend's product against dense, the quick run's table.

Correctness only: no assertion on a time (2 shared cores make timings noise here).
"""

import importlib.util
import json

import pandas as pd
import pytest
import torch
from conftest import REPO

from sd2.hub import LLAMA_3_2
from sd2.masks import magnitude_mask, n_zeros

spec = importlib.util.spec_from_file_location("sparse_kernels", REPO / "benchmarks" / "sparse_kernels.py")
sk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sk)


def test_llama_shapes_group_projections_of_one_shape():
    assert sk.linear_shapes(LLAMA_3_2["Llama-3.2-1B"]) == [
        ("q_proj/o_proj", 2048, 2048, 2),
        ("k_proj/v_proj", 512, 2048, 2),
        ("gate_proj/up_proj", 8192, 2048, 2),
        ("down_proj", 2048, 8192, 1),
    ]
    assert sk.linear_shapes(LLAMA_3_2["Llama-3.2-3B"]) == [
        ("q_proj/o_proj", 3072, 3072, 2),
        ("k_proj/v_proj", 1024, 3072, 2),
        ("gate_proj/up_proj", 8192, 3072, 2),
        ("down_proj", 3072, 8192, 1),
    ]
    # head_dim defaults to hidden / heads, as in the config's scratch drafts.
    draft = {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
    assert sk.linear_shapes(draft)[1] == ("k_proj/v_proj", 48, 96, 2)


def test_pruned_weights_are_magnitude_masks_with_exactly_the_zeros_asked_for():
    sparsities = [0.0, 0.5, 0.7, 0.9]
    pruned = sk.pruned_weights(37, 53, sparsities, seed=0)
    dense = pruned[0.0]
    for sparsity in sparsities:
        assert int((pruned[sparsity] == 0).sum()) == n_zeros(sparsity, dense.numel())
        assert torch.equal(pruned[sparsity], dense * magnitude_mask(dense, sparsity))


def test_every_backend_computes_the_dense_product(one_thread):
    backends, _ = sk.load_backends(None)
    assert {"dense", "torch_csr", "torch_csr_i32", "torch_coo"} <= {b.name for b in backends}
    weight = sk.pruned_weights(24, 40, [0.7], seed=1)[0.7]
    for batch in (1, 3):
        x = torch.randn(batch, 40)
        expected = x @ weight.T
        for backend in backends:
            backend.set_threads(1)
            fmt = backend.convert(weight)
            fmts = [fmt, backend.copy(fmt)]
            inp = backend.inputs(x)
            run, products = backend.runner(fmts, inp)
            run()
            for copy in fmts:
                got = backend.output(backend.call(copy, inp), batch)
                assert got.shape == (batch, 24), backend.name
                torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5, msg=backend.name)
            assert products == (2 if backend.name == "deepsparse" else 1)
    # bf16: the dense product and torch's COO path, the only torch sparse layout with a bf16 matmul on CPU.
    x = torch.randn(3, 40).bfloat16()
    for backend in (sk.Dense(), sk.TorchCOO()):
        got = backend.output(backend.call(backend.convert(weight.bfloat16()), backend.inputs(x)), 3)
        assert got.dtype == torch.bfloat16
        assert sk.relative_error(got, x.float() @ weight.bfloat16().float().T) < 2e-2


def test_quick_run_writes_table_provenance_and_figure(tmp_path, one_thread):
    out = tmp_path / "sparse_kernels.csv"
    sk.main(
        ["--quick", "--config", str(REPO / "config" / "test.yaml"), "--batches", "1", "3", "--out", str(out)]
        + ["--figure", str(tmp_path / "figures" / "sparse_kernels")]
    )
    table = pd.read_csv(out)
    assert list(table.columns) == sk.COLUMNS
    assert set(table["model"]) == {"tiny-draft"}
    assert set(table["sparsity"]) == {0, 70} and set(table["batch"]) == {1, 3} and set(table["threads"]) == {1}
    cells = ["model", "shape_name", "batch", "sparsity", "dtype", "threads"]
    # One row per backend in every cell, dense included, each backend's whatever its status.
    n_backends = len(sk.BACKENDS)
    assert (table.groupby(cells).size() == n_backends).all()
    ok = table[table["status"] == "ok"]
    # The table rounds medians to 0.01 us and speed-ups to 4 decimals: the unrounded medians' ratio lies
    # between the ratios of the stored medians' extremes, and the stored speed-up within 0.00005 of it.
    half_us, half_speedup, float_slack = 0.005, 0.00005, 1e-9
    low = (ok["dense_median_us"] - half_us) / (ok["median_us"] + half_us)
    high = (ok["dense_median_us"] + half_us) / (ok["median_us"] - half_us).where(ok["median_us"] > half_us)
    high = high.fillna(float("inf"))  # a median that rounds to 0.00 us bounds nothing from above
    assert (ok["speedup"] >= low - half_speedup - float_slack).all()
    assert (ok["speedup"] <= high + half_speedup + float_slack).all()
    assert (ok[ok["backend"] == "dense"]["speedup"] == 1).all()
    assert (ok["reps"] == 3).all() and (ok["calls_per_rep"] >= 1).all()
    assert not ok["cold"].any()  # a tiny draft fits in any cache
    # The CSR backend: the dense product (fp32), unsupported in bf16 (MKL's kernel has none).
    csr = table[table["backend"] == "torch_csr"]
    assert (csr[csr["dtype"] == "fp32"]["status"] == "ok").all()
    assert csr[csr["dtype"] == "fp32"]["max_rel_err"].max() < 1e-5
    assert csr[csr["dtype"] == "bf16"]["status"].str.startswith("unsupported: NotImplementedError").all()
    assert (
        (table[(table["backend"] == "torch_coo") & (table["dtype"] == "fp32")]["status"])
        .str.startswith("skipped")
        .all()
    )
    # int32 CSR bytes: values and column indices per nonzero, one row pointer per row + 1.
    i32 = ok[(ok["backend"] == "torch_csr_i32") & (ok["sparsity"] == 70)].iloc[0]
    numel = i32["out_features"] * i32["in_features"]
    nnz = numel - n_zeros(0.7, numel)
    assert i32["weight_bytes"] == nnz * 8 + (i32["out_features"] + 1) * 4
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["settings"]["quick"] and meta["settings"]["sparsities"] == [0.0, 0.7]
    assert (
        meta["settings"]["backends"]["torch_csr"] == torch.__version__
        and meta["settings"]["cpu"] == table["cpu"].iloc[0]
    )
    for ext in ("png", "pdf"):
        assert (tmp_path / "figures" / f"sparse_kernels.{ext}").stat().st_size > 1000
    layer = sk.sparse_layer_speedups(table)
    one = layer[(layer["backend"] == "torch_csr") & (layer["dtype"] == "fp32")].iloc[0]
    rows = ok[(ok["backend"] == "torch_csr") & (ok["dtype"] == "fp32")]
    rows = rows[(rows["batch"] == one["batch"]) & (rows["sparsity"] == one["sparsity"])]
    summed = (rows["dense_median_us"] * rows["count_per_layer"]).sum() / (
        rows["median_us"] * rows["count_per_layer"]
    ).sum()
    assert one["speedup"] == pytest.approx(summed)
