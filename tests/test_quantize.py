import json

import pytest
import torch
from compressed_tensors.quantization import fake_quantize as ct_fake_quantize
from safetensors import safe_open

from sd2.calibration import calibration_set
from sd2.drafts.quantize import (
    _run_oneshot,
    check_mask,
    fake_quantize,
    fake_quantized,
    masked_quantize_weight,
    quantize,
)
from sd2.measure.weight_bytes import layer_bytes
from sd2.models import build_model, decoder_linears, load_model, load_tokenizer
from sd2.quantized import group_size, load_quantized, weight_bits

GPTQ_SETTINGS = dict(calibration_samples=4, calibration_seq_len=32)


def _quantize(src, out, scheme, method, calibration):
    return quantize(src, out, scheme=scheme, method=method, calibration=calibration, settings=GPTQ_SETTINGS, seed=0)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_keeps_mask_and_saves_compressed_tensors(
    sparse_draft_dir, calibration_dir, tmp_path, one_thread, scheme, method
):
    out = tmp_path / "q"
    summary = _quantize(sparse_draft_dir, out, scheme, method, calibration_dir)

    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["ignore"] == ["lm_head"]
    bits, _, group = weight_bits(scheme)
    for grp in qconfig["config_groups"].values():
        weights = grp["weights"]
        assert (weights["num_bits"], weights["symmetric"], weights["type"]) == (bits, True, "int")
        assert weights["strategy"] == ("channel" if group is None else "group")
    # Packed integers and scales for the decoder linears; embeddings stay float.
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.down_proj.weight_packed" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
    assert "model.embed_tokens.weight" in keys

    before, after = load_model(sparse_draft_dir), load_quantized(out)
    assert set(after.state_dict()) == set(before.state_dict())  # a plain model: the scales are gone
    assert check_mask(before, after) == summary["rounded_to_zero"]
    assert summary["mask_kept"] and summary["zero_fraction_before"] == pytest.approx(
        {n: 0.5 for n in decoder_linears(before)}
    )
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(before.state_dict()[name], after.state_dict()[name]), name
    for name, module in decoder_linears(after).items():
        w = module.weight
        assert not torch.equal(w, decoder_linears(before)[name].weight), name  # quantized, not copied
        per_row = w.unflatten(-1, (-1, min(group or w.shape[1], w.shape[1])))
        for row in per_row.flatten(0, 1)[:8]:  # values on a grid of at most 2^bits steps per group
            assert row.unique().numel() <= 2**bits
    saved = json.loads((out / "provenance.json").read_text())
    assert saved["settings"]["quantization"] == scheme and saved["settings"]["method"] == method
    assert saved["rounded_to_zero"] == summary["rounded_to_zero"] and saved["versions"]["llmcompressor"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_loaded_weights_are_llmcompressors(sparse_draft_dir, calibration_dir, tmp_path, one_thread, method):
    """Saved, reloaded and dequantized on the CPU: bitwise the weights llm-compressor computed in memory;
    round to nearest is also bitwise fake_quantize's, and so are the logits."""
    scheme = "w4a16"
    _quantize(sparse_draft_dir, tmp_path / "q", scheme, method, calibration_dir)
    loaded = load_quantized(tmp_path / "q")

    tokenizer = load_tokenizer(sparse_draft_dir)
    in_memory = load_model(sparse_draft_dir)
    original = {n: m.weight.detach().clone() for n, m in decoder_linears(in_memory).items()}
    calib, _ = calibration_set(calibration_dir, tokenizer, 4, 32, 0)
    _run_oneshot(in_memory, tokenizer, scheme, method, calib if method == "gptq" else None, 32)
    for name, module in decoder_linears(in_memory).items():
        # GPTQ leaves its dequantized result in .weight, RTN only the scales: quantize-dequantize with them.
        dequantized = ct_fake_quantize(
            module.weight, module.weight_scale, module.weight_zero_point, module.quantization_scheme.weights
        )
        assert torch.equal(decoder_linears(loaded)[name].weight, dequantized), name
        assert not dequantized[original[name] == 0].any(), name

    if method == "rtn":
        fake = load_model(sparse_draft_dir)
        with torch.no_grad():
            for name, module in decoder_linears(fake).items():
                module.weight.copy_(fake_quantize(module.weight, scheme))
                assert torch.equal(module.weight, decoder_linears(loaded)[name].weight), name
        ids = tokenizer("def f(x):\n    return x", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, fake(ids).logits)
            # transformers' default load (sd2.models.load_model) keeps the integers packed and decompresses
            # them on the first forward pass: the same logits.
            torch.testing.assert_close(load_model(tmp_path / "q")(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_fake_quantize_is_llmcompressors_rtn(tiny_llama_draft_dir, tmp_path, one_thread, scheme):
    """On bf16 layers 128 and 256 inputs wide (w4a16: one and two groups of 128), bitwise llm-compressor's RTN."""
    tokenizer = load_tokenizer(tiny_llama_draft_dir)
    spec = dict(arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4)
    build_model(spec, tokenizer, seed=3).save_pretrained(tmp_path / "wide")  # oneshot wants a model from disk
    model = load_model(tmp_path / "wide", dtype="bfloat16")
    original = {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}
    _run_oneshot(model, tokenizer, scheme, "rtn", None, None)
    for name, module in decoder_linears(model).items():
        args = module.quantization_scheme.weights
        assert args.group_size == (None if scheme == "w8a16" else 128), name
        theirs = ct_fake_quantize(original[name], module.weight_scale, module.weight_zero_point, args)
        assert torch.equal(fake_quantize(original[name], scheme), theirs), name


def test_dense_input(tiny_llama_draft_dir, calibration_dir, tmp_path, one_thread):
    """An unpruned draft quantizes too: no zeros to keep; the zeros after are weights rounded to 0."""
    summary = _quantize(tiny_llama_draft_dir, tmp_path / "q", "w4a16", "gptq", calibration_dir)
    assert set(summary["zero_fraction_before"].values()) == {0.0}
    loaded = load_quantized(tmp_path / "q")
    assert sum(summary["rounded_to_zero"].values()) == sum(
        int((m.weight == 0).sum()) for m in decoder_linears(loaded).values()
    )


def _gptq_problem(sparse: bool):
    """Two 16 x 256 weights (two groups of 128), their Hessians from 512 inputs, the observer's w4a16 qparams."""
    from compressed_tensors.quantization import QuantizationArgs

    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(2, 16, 256, generator=gen)
    if sparse:
        weights *= torch.rand(2, 16, 256, generator=gen) > 0.5
    inputs = torch.randn(2, 256, 512, generator=gen) * torch.linspace(0.2, 3, 256)[:, None]  # uneven columns
    hessians = 2 * inputs @ inputs.transpose(1, 2) / 512
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128, actorder="static")
    scale = weights.abs().unflatten(-1, (2, 128)).amax(-1) / 7.5
    return weights, hessians, scale, torch.zeros_like(scale, dtype=torch.int8), args, inputs


def test_masked_gptq_is_llmcompressors_gptq_holding_the_mask():
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    def run(fn, problem):
        weights, hessians, scale, zero_point, args, _ = problem
        return fn(weights.clone(), hessians.clone(), scale, zero_point, None, args)[0]

    dense = _gptq_problem(sparse=False)
    assert torch.equal(run(masked_quantize_weight, dense), run(quantize_weight, dense))  # no zeros: the same

    problem = _gptq_problem(sparse=True)
    weights, inputs = problem[0], problem[-1]
    ours, theirs = run(masked_quantize_weight, problem), run(quantize_weight, problem)
    pruned = weights == 0
    assert not ours[pruned].any() and theirs[pruned].count_nonzero() > pruned.sum() // 20  # theirs fills ~10%
    for w in (ours, theirs.masked_fill(pruned, 0)):  # on the quantization grid
        args = problem[4]
        assert torch.equal(ct_fake_quantize(w[0], problem[2][0], problem[3][0], args), w[0])

    def output_error(q):
        return ((weights - q) @ inputs).square().sum().item()

    # Holding the mask inside the loop beats zeroing the filled weights afterwards.
    assert output_error(ours) < output_error(theirs.masked_fill(pruned, 0))


def test_bad_arguments(sparse_draft_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization scheme 'w3a16'"):
        quantize(sparse_draft_dir, tmp_path / "x", scheme="w3a16", method="rtn", seed=0)
    with pytest.raises(ValueError, match="'none' means the draft is not quantized"):
        quantize(sparse_draft_dir, tmp_path / "x", scheme="none", method="rtn", seed=0)
    with pytest.raises(ValueError, match="unknown quantization method 'awq'"):
        quantize(sparse_draft_dir, tmp_path / "x", scheme="w8a16", method="awq", seed=0)
    with pytest.raises(ValueError, match="'gptq' needs calibration data"):
        quantize(sparse_draft_dir, tmp_path / "x", scheme="w8a16", method="gptq", seed=0)
    with pytest.raises(ValueError, match="unknown quantization scheme 'int4'"):
        fake_quantize(torch.ones(2, 4), "int4")
    assert group_size("w4a16", 200) == 100 and group_size("w4a16", 176) == 88 and group_size("w4a16", 8192) == 128
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="not a compressed-tensors checkpoint"):
        load_quantized(sparse_draft_dir)


def test_check_mask_names_the_layer(sparse_draft_dir):
    before, after = load_model(sparse_draft_dir), load_model(sparse_draft_dir)
    name, module = list(decoder_linears(after).items())[3]
    with torch.no_grad():
        module.weight[module.weight == 0] = 1e-3
    with pytest.raises(RuntimeError, match=f"layer {name}: .* zeros are no longer zero"):
        check_mask(before, after)


def test_fake_quantize_maths_and_gradient():
    w = torch.tensor([[0.0, 1.5, -3.0, 0.2, 7.5, -0.1, 0.0, 0.4]], requires_grad=True)
    q = fake_quantize(w, "w4a16")  # one group (8 < 128): scale 7.5 / 7.5 = 1, 7.5 clips to 7
    assert q.tolist() == [[0.0, 2.0, -3.0, 0.0, 7.0, 0.0, 0.0, 0.0]]
    q.sum().backward()
    assert w.grad.tolist() == [[1.0] * 8]  # straight through
    w8 = torch.tensor([[0.0, 1.0, -127.5], [0.0, 0.0, 0.0]])  # per row: scale 1 (-127.5 rounds to even -128)
    assert fake_quantize(w8, "w8a16").tolist() == [[0.0, 1.0, -128.0], [0.0, 0.0, 0.0]]  # the zero row stays
    groups = torch.randn(2, 256)
    groups[:, 128:] *= 100  # the second group's scale does not touch the first's values
    assert torch.equal(fake_quantize(groups, "w4a16")[:, :128], fake_quantize(groups[:, :128], "w4a16"))


def test_fake_quantized_forward_for_training(sparse_draft_dir, tmp_path, one_thread):
    """Inside fake_quantized: the logits of the round-to-nearest checkpoint, gradients reach the weights."""
    from sd2.masks import hold_masks, sparsity_masks

    _quantize(sparse_draft_dir, tmp_path / "q", "w4a16", "rtn", None)
    quantized, model = load_quantized(tmp_path / "q"), load_model(sparse_draft_dir).train()
    masks = sparsity_masks(decoder_linears(model))
    hold_masks(model, masks)  # finetune's gradient hooks on the weights keep working
    ids = load_tokenizer(sparse_draft_dir)("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    plain = model(ids).logits.detach()
    with fake_quantized(model, "w4a16"):
        logits = model(ids).logits
        torch.testing.assert_close(logits, quantized(ids).logits)
        logits.logsumexp(-1).sum().backward()
    for name, module in decoder_linears(model).items():
        assert module.weight.grad.abs().sum() > 0 and not module.weight.grad[~masks[name]].any(), name
    assert torch.equal(model(ids).logits, plain)  # the plain forward is back


def test_weight_bits_match_the_checkpoint(sparse_draft_dir, tmp_path, one_thread):
    assert weight_bits("w8a16") == (8, 16, None) and weight_bits("w4a16") == (4, 16, 128)
    assert layer_bytes(2048, 8192, 0, "w4a16")["dense"] == 2048 * 8192 / 2 + 2048 * 64 * 2
    _quantize(sparse_draft_dir, tmp_path / "q", "w4a16", "rtn", None)
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        for name, module in decoder_linears(load_model(sparse_draft_dir)).items():
            stored = sum(f.get_tensor(f"{name}.weight_{p}").nbytes for p in ("packed", "scale"))
            rows, cols = module.weight.shape
            assert stored == layer_bytes(rows, cols, 0, "w4a16", scale_bits=32)["dense"], name
