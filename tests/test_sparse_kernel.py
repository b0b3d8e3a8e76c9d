"""sd2.sparse_kernel (a draft's sparse layers as torch CSR) and benchmarks/sparse_decoding.py, on tiny models.

Correctness only: no assertion on a time (2 shared cores make timings noise here).
"""

import argparse
import importlib.util

import pandas as pd
import pytest
import torch
from conftest import REPO
from torch import nn

from sd2.masks import magnitude_mask
from sd2.measure import speculative as sp
from sd2.models import decoder_linears, load_model, load_tokenizer
from sd2.report import readme
from sd2.sparse_kernel import MIN_SPARSITY, CSRLinear, kernel_modules, sparse_layers, swapped

spec = importlib.util.spec_from_file_location("sparse_decoding", REPO / "benchmarks" / "sparse_decoding.py")
sd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sd)

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned(model, sparsity):
    with torch.no_grad():
        for linear in decoder_linears(model).values():
            linear.weight.mul_(magnitude_mask(linear.weight, sparsity))
    return model


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 5, 48), (48,)])
def test_csr_linear_is_the_dense_product(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 24, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(magnitude_mask(linear.weight, 0.7))
    csr = CSRLinear(linear)
    assert csr.weight.layout == torch.sparse_csr and csr.weight.col_indices().dtype == torch.int32
    assert csr.weight.values().numel() == int((linear.weight != 0).sum())
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(csr(x), linear(x), rtol=1e-5, atol=1e-6)


def test_only_layers_sparse_enough_are_swapped_and_all_come_back(tiny_llama_draft_dir):
    draft = load_model(tiny_llama_draft_dir)
    linears = decoder_linears(draft)
    dense_ones = set(list(linears)[:2])
    with torch.no_grad():
        for name, linear in linears.items():
            linear.weight.mul_(magnitude_mask(linear.weight, 0.5 if name in dense_ones else 0.7))
    before = dict(draft.named_modules())
    assert MIN_SPARSITY == 0.6 and set(sparse_layers(draft)) == set(linears) - dense_ones
    modules = kernel_modules(draft, "csr")
    with swapped(draft, modules):
        assert set(modules) == set(linears) - dense_ones
        assert {n for n, m in draft.named_modules() if isinstance(m, CSRLinear)} == set(modules)
        assert not isinstance(draft.lm_head, CSRLinear)  # the lm_head is dense
    assert dict(draft.named_modules()) == before
    modules = kernel_modules(draft, "dense")
    with swapped(draft, modules):
        assert modules == {} and dict(draft.named_modules()) == before


def test_csr_draft_commits_the_same_tokens_as_the_dense_draft(tiny_llama_dir, tiny_llama_draft_dir):
    target, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    draft = _pruned(load_model(tiny_llama_draft_dir), 0.7)
    prompts = [tok("def add(a, b):\n    return")["input_ids"], tok("for i in range(3):")["input_ids"]]
    runs = {}
    for kernel in ("dense", "csr"):
        with swapped(draft, kernel_modules(draft, kernel)):
            runs[kernel] = sp.assisted_runs(
                target, draft, tok, tok, prompts, k=3, temperature=0.0, max_new_tokens=12, seed=0
            )
    assert [r["tokens"] for r in runs["csr"]] == [r["tokens"] for r in runs["dense"]]
    assert [r["steps"] for r in runs["csr"]] == [r["steps"] for r in runs["dense"]]


def test_csr_refuses_what_it_cannot_run(tiny_llama_draft_dir):
    draft = _pruned(load_model(tiny_llama_draft_dir), 0.7).to(torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 on a CPU only.*bfloat16"):
        kernel_modules(draft, "csr")
    assert not any(isinstance(m, CSRLinear) for m in draft.modules())
    with pytest.raises(ValueError, match="unknown draft kernel 'mkl'"):
        kernel_modules(draft, "mkl")


def test_benchmark_case_times_every_arm_prompt_by_prompt(tmp_path, tiny_llama_dir, tiny_llama_draft_dir):
    target, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    draft = _pruned(load_model(tiny_llama_draft_dir), 0.7)
    prompts = [tok(text)["input_ids"] for text in ("def f(x):", "import os", "class A:", "while True:")]
    case = {"case": "tiny", "target": target, "draft": draft, "prompts": prompts, "pad": tok.pad_token_id}
    args = argparse.Namespace(k=3, draft_tokens=6, bootstrap=200, seed=0)
    summary, per_prompt = sd.run_case(case, 1, 10, args)
    assert [r["warmup"] for r in per_prompt] == [True, False, False, False]
    assert [r["order"][0] for r in per_prompt] == ["dense", "csr", "bf16", "dense"]  # each arm goes first in turn
    assert summary["prompts"] == 3 and summary["same_tokens"] == 3
    assert summary["csr_layers"] == len(decoder_linears(draft))
    for run in ("speculative", "draft_alone"):
        for a, b in sd.RATIOS:
            name = f"{run}_{a}_over_{b}"
            assert summary[f"{name}_ci_low"] <= summary[name] <= summary[f"{name}_ci_high"]
        expected = summary[f"{run}_tokens_per_s_csr"] / summary[f"{run}_tokens_per_s_dense"]
        assert summary[f"{run}_csr_over_dense"] == pytest.approx(expected)
    assert 1 <= summary["mal"] <= args.k + 1
    assert all(0 < r["dense_draft_new"] == r["csr_draft_new"] <= 6 for r in per_prompt)
    assert not any(isinstance(m, CSRLinear) for m in draft.modules())  # the draft leaves dense
    assert next(draft.parameters()).dtype == torch.float32
    (tmp_path / "tables").mkdir()
    pd.DataFrame([summary]).to_csv(tmp_path / "tables" / "sparse_decoding.csv", index=False)
    block = readme.sparse_decoding(tmp_path)
    rows = [line for line in block.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[2] for row in rows] == ["speculative", "draft alone"]
    low, high = summary["speculative_csr_over_dense_ci_low"], summary["speculative_csr_over_dense_ci_high"]
    verdict = "faster" if low > 1 else "slower" if high < 1 else "not distinguishable"
    assert rows[0].split(" | ")[9] == verdict and "3 of 3 prompts agreed" in block
