import csv
import json

import pytest
import torch
from safetensors import safe_open

from sd2 import methods
from sd2.chunked_loss import chunked_causal_lm_loss
from sd2.drafts.finetune import finetune
from sd2.drafts.losses import kl_loss, layer_states, squarehead, squarehead_layers, tvdpp_loss
from sd2.drafts.prune import prune
from sd2.drafts.skd import interleaved_responses, replace_outside_top_k, skd_batch
from sd2.masks import check_masks, hold_masks, sparsity_masks, zero_counts
from sd2.models import decoder_linears, load_model, load_tokenizer

SETTINGS = dict(
    loss="ce",
    epochs=10,
    max_steps=40,
    batch_size=8,
    seq_len=64,
    lr=1e-2,
    validation_fraction=0.2,
    eval_every=20,
    warmup_steps=2,
    weight_decay=0.0,
    bf16="auto",
    micro_batch_size=None,
    gradient_checkpointing=False,
    loss_chunk_tokens=None,
)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_llama_draft_dir, sft_data_dir):
    out = tmp_path_factory.mktemp("pruned") / "s50"
    prune(
        tiny_llama_draft_dir,
        sft_data_dir,
        out,
        sparsity=50,
        settings=dict(pruner="magnitude", structure="unstructured", calibration_samples=4, calibration_seq_len=32),
        seed=0,
    )
    return out


def tv(p_logits, q_logits):
    return 0.5 * (p_logits.softmax(-1) - q_logits.softmax(-1)).abs().sum(-1).mean()


def test_masks_unchanged_by_an_optimizer_step(pruned_dir):
    model = load_model(pruned_dir).train()
    masks = sparsity_masks(decoder_linears(model))
    assert len(masks) == 7  # every decoder linear of the one-layer draft
    after_step = hold_masks(model, masks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ids = torch.randint(0, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    after_step(model)
    for name, module in decoder_linears(model).items():
        assert torch.equal(module.weight != 0, masks[name]), name


def test_every_built_in_loss_resolves_to_its_objective_and_an_unknown_loss_is_named(tmp_path):
    for name in ("ce", "kl", "tvdpp", "squarehead", "skd"):
        objective = methods.resolve(methods.loss(name).objective)
        assert objective.__name__ == name and objective.definition
    with pytest.raises(ValueError, match=r"unknown loss 'x' \(known: ce, kl, tvdpp, squarehead, skd"):
        finetune(tmp_path / "init", tmp_path / "data", tmp_path / "out", settings={**SETTINGS, "loss": "x"}, seed=0)


def test_ce_finetune_keeps_sparsity_and_lowers_validation_loss(pruned_dir, sft_data_dir, tmp_path):
    out = tmp_path / "ft"
    history = finetune(pruned_dir, sft_data_dir, out, settings=SETTINGS, seed=0)
    assert [h["step"] for h in history] == [0, 20, 40]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.3
    before, after = load_model(pruned_dir), load_model(out)
    for (name, b), a in zip(decoder_linears(before).items(), decoder_linears(after).values()):
        assert torch.equal(b.weight != 0, a.weight != 0), name
        assert int((a.weight == 0).sum()) == round(0.5 * a.weight.numel())
        assert not torch.equal(b.weight, a.weight)  # it did train
    info = json.loads((out / "provenance.json").read_text())
    assert info["sparsity_before"] == info["sparsity_after"] and info["settings"]["finetune"] == SETTINGS
    assert info["memory"]["micro_batch_size"] == 8 and info["memory"]["accumulation_steps"] == 1
    assert info["memory"]["saved_dtype"] == "float32"
    rows = list(csv.DictReader(open(out / "training.csv")))
    assert len(rows) == len(history) and "val_loss" in rows[0]


def test_bf16_draft_trains_in_fp32_in_micro_batches_and_is_saved_in_bf16(pruned_dir, sft_data_dir, tmp_path):
    bf16_dir = tmp_path / "bf16"
    load_model(pruned_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    load_tokenizer(pruned_dir).save_pretrained(bf16_dir)
    settings = {
        **SETTINGS,
        "max_steps": 4,
        "eval_every": 4,
        "micro_batch_size": 3,
        "gradient_checkpointing": True,
        "loss_chunk_tokens": 64,
    }
    out = tmp_path / "ft"
    history = finetune(bf16_dir, sft_data_dir, out, settings=settings, seed=0)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    info = json.loads((out / "provenance.json").read_text())
    assert info["memory"] == {
        "micro_batch_size": 3,
        "accumulation_steps": 3,
        "gradient_checkpointing": True,
        "loss_chunk_tokens": 64,
        "loss": info["memory"]["loss"],
        "master_weights": "float32",
        "saved_dtype": "bfloat16",
    }
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    before, after = load_model(bf16_dir, dtype=torch.float32), load_model(out, dtype=torch.float32)
    assert after.config.use_cache is not False  # no training setting saved
    for (name, b), a in zip(decoder_linears(before).items(), decoder_linears(after).values()):
        assert torch.equal(b.weight != 0, a.weight != 0), name
        assert not torch.equal(b.weight, a.weight)


def test_a_weight_lost_in_the_cast_to_bf16_is_caught(pruned_dir):
    model = load_model(pruned_dir, dtype=torch.float32)
    masks, zeros = sparsity_masks(decoder_linears(model)), zero_counts(decoder_linears(model))
    name, layer = next(iter(decoder_linears(model).items()))
    with torch.no_grad():
        i, j = masks[name].nonzero()[0].tolist()
        layer.weight[i, j] = 1e-45  # a kept weight below bf16's smallest subnormal
    check_masks(decoder_linears(model), masks, zeros)
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"layer {name}: .* when cast to bfloat16"):
        check_masks(decoder_linears(model), masks, zeros, when="when cast to bfloat16")


@pytest.mark.parametrize("loss", ["kl", "tvdpp"])
def test_distillation_losses_run_with_a_same_tokenizer_teacher(
    pruned_dir, sft_data_dir, tiny_llama_dir, tmp_path, loss
):
    settings = {**SETTINGS, "loss": loss, "max_steps": 4, "eval_every": 4}
    history = finetune(pruned_dir, sft_data_dir, tmp_path / loss, settings=settings, seed=0, teacher_dir=tiny_llama_dir)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history[1:])


def test_kl_needs_the_same_tokenizer(pruned_dir, sft_data_dir, tiny_qwen_dir, tmp_path):
    with pytest.raises(ValueError, match="share a tokenizer"):
        finetune(
            pruned_dir,
            sft_data_dir,
            tmp_path / "x",
            settings={**SETTINGS, "loss": "kl"},
            seed=0,
            teacher_dir=tiny_qwen_dir,
        )
    with pytest.raises(ValueError, match="teacher_dir"):
        finetune(pruned_dir, sft_data_dir, tmp_path / "x", settings={**SETTINGS, "loss": "tvdpp"}, seed=0)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("loss_fn", [kl_loss, tvdpp_loss])
def test_loss_is_flat_for_identical_distributions(loss_fn):
    logits = torch.randn(4, 16, 10, requires_grad=True)
    mask = torch.ones(4, 16, dtype=torch.bool)
    loss = loss_fn(logits, logits.detach().clone(), mask)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and logits.grad.abs().max() < 1e-6


@pytest.mark.parametrize("loss_fn", [kl_loss, tvdpp_loss])
def test_gradient_moves_q_toward_p(loss_fn):
    torch.manual_seed(0)
    p_logits = torch.randn(10).expand(4096, 10)
    q_logits = torch.randn(10, requires_grad=True)
    mask = torch.ones(4096, dtype=torch.bool)
    mask[::7] = False  # masked positions do not count
    loss_fn(q_logits.expand(4096, 10), p_logits, mask).backward()
    with torch.no_grad():
        stepped = q_logits - 0.1 * q_logits.grad / q_logits.grad.norm()
    assert tv(p_logits[0], stepped) < tv(p_logits[0], q_logits.detach())


def test_masked_positions_do_not_contribute():
    p, q = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    other = q.clone()
    other[~mask] = torch.randn_like(other[~mask])
    assert torch.allclose(kl_loss(q, p, mask), kl_loss(other, p, mask))


def test_tvdpp_gradient_estimates_the_tv_gradient():
    torch.manual_seed(1)
    p_logits = torch.randn(10).expand(4096, 10)
    q_logits = torch.randn(10, requires_grad=True)
    tvdpp_loss(q_logits.expand(4096, 10), p_logits, torch.ones(4096, dtype=torch.bool)).backward()
    exact = q_logits.detach().clone().requires_grad_()
    tv(p_logits[0], exact).backward()
    assert torch.nn.functional.cosine_similarity(q_logits.grad, exact.grad, dim=0) > 0.9


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    from itertools import islice

    from sd2.training import shuffled_batches

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 200, (100,), generator=gen).tolist()
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate(lengths)]

    def epoch(group):
        batches = list(islice(shuffled_batches(examples, 8, 0, seed=1, group=group), 13))  # 100 / 8 -> 13 batches
        seen = sorted(int(ids[0]) for b in batches for ids in b["input_ids"])
        padded = sum(b["input_ids"].numel() for b in batches)
        return seen, padded, batches

    seen, padded_grouped, batches = epoch(8)
    assert seen == list(range(100))
    _, padded_random, _ = epoch(1)
    assert padded_grouped < 0.8 * padded_random
    again = list(islice(shuffled_batches(examples, 8, 0, seed=1, group=8), 13))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    # Each batch keeps its examples' own tokens and labels, padding masked out.
    for b in batches:
        for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
            n = int(mask.sum())
            assert lengths[int(ids[0])] == n and (labels[n:] == -100).all()


# ---- squarehead and skd ----

SKD = dict(skd_top_k=25, skd_decoding="sample", skd_max_new_tokens=None)


def response_batch(seed=0, n=3, prompt=6, width=14, vocab=500):
    """Random ids, the first `prompt` positions unlabelled, the last row padded after 10 tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, width), generator=gen)
    labels = ids.clone()
    labels[:, :prompt] = -100
    attention = torch.ones_like(ids)
    attention[-1, 10:], labels[-1, 10:] = 0, -100
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def squarehead_term(model, teacher, batch):
    return squarehead(model, teacher, batch, 64) - chunked_causal_lm_loss(model, batch, 64)


def test_squarehead_is_zero_against_itself_and_positive_once_perturbed(tiny_llama_dir):
    model, teacher = load_model(tiny_llama_dir), load_model(tiny_llama_dir)
    batch = response_batch()
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        layers = squarehead_layers(layer_states(model, batch, keep), layer_states(teacher, batch, keep))
        assert len(layers) == model.config.num_hidden_layers and layers.abs().max() < 1e-12
        assert abs(squarehead_term(model, teacher, batch)) < 1e-6
        torch.manual_seed(0)
        for name, module in decoder_linears(model).items():
            if ".layers.0." in name:
                module.weight.add_(0.02 * torch.randn_like(module.weight))
        perturbed = squarehead_layers(layer_states(model, batch, keep), layer_states(teacher, batch, keep))
    assert (perturbed > 1e-3).all()  # the first layer's change reaches every later layer
    assert squarehead_term(model, teacher, batch).item() == pytest.approx(perturbed.sum().item(), rel=1e-4)


def test_squarehead_gradient_brings_the_sparse_draft_back_toward_the_dense_one(pruned_dir, tiny_llama_draft_dir):
    model, teacher = load_model(pruned_dir).train(), load_model(tiny_llama_draft_dir)
    masks = sparsity_masks(decoder_linears(model))
    after_step = hold_masks(model, masks)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = response_batch(seed=1)
    keep = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        teacher_states = layer_states(teacher, batch, keep)
    values = []
    for _ in range(6):
        loss = squarehead_layers(layer_states(model, batch, keep), teacher_states).sum()
        values.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step(model)
    assert values[-1] < 0.5 * values[0] and all(b < a for a, b in zip(values, values[1:]))
    for name, module in decoder_linears(model).items():
        assert torch.equal(module.weight != 0, masks[name]), name


def test_squarehead_needs_the_draft_s_own_shapes(pruned_dir, sft_data_dir, tiny_llama_dir, tmp_path):
    h = [torch.randn(5, 16), torch.randn(5, 16)]
    with pytest.raises(ValueError, match="2 hidden-state layers, the teacher 1"):
        squarehead_layers(h, h[:1])
    with pytest.raises(ValueError, match=r"layer 1 hidden states are \(5, 16\) in the draft and \(5, 32\)"):
        squarehead_layers(h, [h[0], torch.randn(5, 32)])
    settings = {**SETTINGS, "loss": "squarehead"}
    with pytest.raises(ValueError, match="num_hidden_layers is 1 in the draft and 2 in the teacher"):
        finetune(pruned_dir, sft_data_dir, tmp_path / "x", settings=settings, seed=0, teacher_dir=tiny_llama_dir)
    assert not (tmp_path / "x").exists()


def test_skd_replaces_exactly_the_tokens_outside_the_teacher_s_top_k():
    teacher_logits = torch.tensor(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0],  # ranks 0..4
            [1.0, 2.0, 3.0, 4.0, 5.0],  # ranks 4..0
            [2.0, 2.0, 2.0, 0.0, 0.0],  # a three-way tie for first
        ]
    )
    replacements = torch.tensor([7, 8, 9])
    proposals = torch.tensor([1, 1, 2])  # ranks 1, 3, 0
    tokens, replaced = replace_outside_top_k(proposals, teacher_logits, 2, replacements)
    assert replaced.tolist() == [False, True, False] and tokens.tolist() == [1, 8, 2]
    tokens, replaced = replace_outside_top_k(torch.tensor([4, 0, 3]), teacher_logits, 1, replacements)
    assert replaced.tolist() == [True, True, True] and tokens.tolist() == [7, 8, 9]
    every = torch.tensor([4, 0, 4])  # the teacher's last choice in each row
    tokens, replaced = replace_outside_top_k(every, teacher_logits, teacher_logits.shape[-1], replacements)
    assert not replaced.any() and torch.equal(tokens, every)


def greedy_reference(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_skd_interleaving_with_k_vocab_is_the_draft_s_and_with_k_1_the_teacher_s_greedy_text(
    tiny_llama_draft_dir, tiny_llama_dir
):
    student, teacher = load_model(tiny_llama_draft_dir), load_model(tiny_llama_dir)
    prompts, limits = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]], [8, 5, 0]
    vocab = student.config.vocab_size
    for top_k, model in [(vocab, student), (1, teacher)]:
        responses, replaced = interleaved_responses(
            student, teacher, prompts, limits, top_k=top_k, greedy=True, stop_ids=[-1], pad_id=0
        )
        assert responses == [greedy_reference(model, p, n) for p, n in zip(prompts, limits)]
        assert (replaced == 0) == (top_k == vocab)
    # A stop token ends its row, and is kept; rows without it go on to their limit.
    references = [greedy_reference(student, p, n) for p, n in zip(prompts, limits)]
    first = references[0]
    stop = first[next((j for j in range(1, len(first)) if first[j] not in first[:j]), 0)]
    responses, _ = interleaved_responses(
        student, teacher, prompts, limits, top_k=vocab, greedy=True, stop_ids=[stop], pad_id=0
    )
    assert responses == [r[: r.index(stop) + 1] if stop in r else r for r in references]
    assert len(responses[0]) < limits[0]


def test_skd_batch_answers_the_data_s_prompts_within_the_data_s_response_lengths(tiny_llama_draft_dir, tiny_llama_dir):
    student, teacher = load_model(tiny_llama_draft_dir), load_model(tiny_llama_dir)
    batch = response_batch(n=3, prompt=6, width=14)  # responses of 8, 8 and 4 tokens
    settings = {**SKD, "skd_top_k": student.config.vocab_size, "skd_decoding": "greedy", "seq_len": 64}
    new, generated, replaced = skd_batch(student, teacher, batch, settings=settings, stop_ids=[-1], pad_id=0)
    prompts = [batch["input_ids"][i, :6].tolist() for i in range(3)]
    expected = [greedy_reference(student, p, n) for p, n in zip(prompts, [8, 8, 4])]
    assert generated == 20 and replaced == 0
    for i in range(3):
        n = int(new["attention_mask"][i].sum())
        assert new["input_ids"][i, :n].tolist() == prompts[i] + expected[i]
        assert new["labels"][i, :n].tolist() == [-100] * 6 + expected[i]
    # seq_len and skd_max_new_tokens cut the responses shorter.
    new, generated, _ = skd_batch(
        student, teacher, batch, settings={**settings, "seq_len": 9, "skd_max_new_tokens": 2}, stop_ids=[-1], pad_id=0
    )
    assert generated == 6 and new["input_ids"].shape[1] == 8


@pytest.mark.parametrize("loss", ["squarehead", "skd"])
def test_finetune_with_squarehead_and_skd_keeps_the_zeros_and_records_the_loss(
    pruned_dir, sft_data_dir, tiny_llama_draft_dir, tiny_llama_dir, tmp_path, loss
):
    teacher = tiny_llama_draft_dir if loss == "squarehead" else tiny_llama_dir  # the dense draft; the target
    settings = {**SETTINGS, **SKD, "loss": loss, "max_steps": 3, "eval_every": 3, "skd_max_new_tokens": 24}
    out = tmp_path / loss
    history = finetune(pruned_dir, sft_data_dir, out, settings=settings, seed=0, teacher_dir=teacher)
    assert [h["step"] for h in history] == [0, 3] and torch.isfinite(torch.tensor(history[-1]["train_loss"]))
    before, after = load_model(pruned_dir), load_model(out)
    for (name, b), a in zip(decoder_linears(before).items(), decoder_linears(after).values()):
        assert torch.equal(b.weight != 0, a.weight != 0), name
        assert not torch.equal(b.weight, a.weight)  # it did train
    info = json.loads((out / "provenance.json").read_text())
    assert info["settings"]["finetune"]["loss"] == loss and info["loss"]["name"] == loss
    assert info["sparsity_before"] == info["sparsity_after"]
    if loss == "skd":
        assert info["loss"]["top_k"] == 25 and info["loss"]["generated_tokens"] > 0
        assert 0 < info["loss"]["replaced_fraction"] <= 1  # two random models disagree somewhere
    else:
        assert info["loss"]["teacher"] == "dense draft"
