import json

import pytest
import torch

from sd2.drafts.prune import exact_sparsity, is_nm, prune
from sd2.masks import magnitude_mask, nm_mask
from sd2.models import decoder_linears, load_model


def _prune(src, calib, out, sparsity=50, **kw):
    settings = dict(pruner="magnitude", structure="unstructured", calibration_samples=4, calibration_seq_len=32)
    return prune(src, calib, out, sparsity=sparsity, settings={**settings, **kw}, seed=0)


def _dense_parts_unchanged(before, after):
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(before.state_dict()[name], after.state_dict()[name]), name


@pytest.mark.parametrize(
    "pruner,structure,sparsity",
    [
        ("magnitude", "unstructured", 70),
        ("magnitude", "2:4", 50),
        ("sparsegpt", "unstructured", 50),
        ("wanda", "unstructured", 70),
        ("sparsegpt", "2:4", 50),
    ],
)
def test_exact_sparsity(tiny_llama_dir, calibration_dir, tmp_path, pruner, structure, sparsity):
    summary = _prune(
        tiny_llama_dir, calibration_dir, tmp_path / "out", pruner=pruner, structure=structure, sparsity=sparsity
    )
    model, dense = load_model(tmp_path / "out"), load_model(tiny_llama_dir)
    linears = decoder_linears(model)
    assert len(linears) == 2 * 7  # q k v o gate up down in both layers
    for name, module in linears.items():
        w = module.weight
        assert int((w == 0).sum()) == round(sparsity / 100 * w.numel()), name
        if structure == "2:4":
            assert is_nm(w), name
    _dense_parts_unchanged(dense, model)
    # SparseGPT updates the surviving weights (OBS); Wanda and magnitude only zero some.
    kept_changed = any(
        not torch.equal(w.weight[w.weight != 0], dict(decoder_linears(dense))[n].weight[w.weight != 0])
        for n, w in linears.items()
    )
    assert kept_changed == (pruner == "sparsegpt")
    saved = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert saved["layer_sparsity"] == summary["layer_sparsity"]
    assert saved["settings"]["pruner"] == pruner and saved["versions"]["torch"]


def test_invalid_sparsity(tiny_llama_dir, calibration_dir, tmp_path):
    for bad in (100, -1, 0.5):
        with pytest.raises(ValueError, match="sparsity"):
            _prune(tiny_llama_dir, calibration_dir, tmp_path / "x", sparsity=bad)
    with pytest.raises(ValueError, match="2:4"):
        _prune(tiny_llama_dir, calibration_dir, tmp_path / "x", sparsity=70, structure="2:4")
    assert not (tmp_path / "x").exists()


def test_masks_are_the_smallest_weights():
    w = torch.tensor([[0.1, -3.0, 0.2, 4.0], [-0.5, 0.05, 2.0, -1.0]])
    assert magnitude_mask(w, 0.5).tolist() == [[False, True, False, True], [False, False, True, True]]
    assert nm_mask(w).tolist() == [[False, True, False, True], [False, False, True, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
def test_magnitude_mask_drops_ties_in_index_order_like_a_stable_sort(sparsity):
    torch.manual_seed(0)
    for w in (torch.randn(32, 24), torch.randint(-3, 4, (32, 24)).float(), torch.zeros(5, 6)):
        order = w.abs().flatten().argsort(stable=True)
        expected = torch.ones(w.numel(), dtype=torch.bool)
        expected[order[: round(sparsity * w.numel())]] = False
        assert torch.equal(magnitude_mask(w, sparsity), expected.view_as(w))


def test_exact_sparsity_fix_both_ways():
    original = torch.arange(1.0, 11.0)
    too_many = original.clone()
    too_many[:7] = 0  # 7 zeros, 5 wanted: the two largest pruned originals come back
    fixed, moved = exact_sparsity(too_many, original, 0.5)
    assert moved == -2 and fixed.tolist() == [0, 0, 0, 0, 0, 6, 7, 8, 9, 10]
    too_few = original.clone()
    too_few[:3] = 0  # 3 zeros, 5 wanted: the two smallest survivors go
    fixed, moved = exact_sparsity(too_few, original, 0.5)
    assert moved == 2 and fixed.tolist() == [0, 0, 0, 0, 0, 6, 7, 8, 9, 10]
