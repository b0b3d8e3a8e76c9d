"""Parallel drafting (sd2.parallel, sd2.measure.parallel, the pard loss): the mask-chain layout, the one-pass
proposals against the draft's own pass with masks appended, the walk against our decoding loop, training.

Tiny random models (tests/conftest.py): a target re-initialised at a larger scale (test_measure.py), and as
draft a perturbed copy of it with a mask token, untrained (its masks propose at random) or trained a few
steps with the pard loss.
"""

import pytest
import torch
from test_finetune import SETTINGS as FINETUNE_SETTINGS
from test_measure import LABELS, PROMPTS, N, _perturbed, _rescaled, eval_dir, outputs, pair  # noqa: F401
from test_measure import SETTINGS as MEASURE_SETTINGS
from transformers import AutoConfig

from sd2 import parallel
from sd2.drafts import losses
from sd2.drafts.finetune import finetune
from sd2.export import export_draft
from sd2.generation import generate_batch
from sd2.measure import acceptance
from sd2.measure import drafts as ms
from sd2.measure.parallel import parallel_generate, parallel_matches
from sd2.models import load_model, load_tokenizer
from sd2.report.collect import collect_measurements
from sd2.report.parallel import parallel_block, parallel_rows

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"k": 4, "keep": 0.7, "keep_min": 0.2, "mask_token": None}
GREEDY = {**MEASURE_SETTINGS, "temperatures": [0.0]}


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    target = _rescaled(load_model(tiny_llama_dir), 0.2, 0)
    draft = _perturbed(target, 0.01, 5)
    draft.config.pard_token = parallel.choose_mask_token(tok, None)
    rows = generate_batch(target, tok, PROMPTS, max_new_tokens=N, temperature=0.0)
    return target, draft, tok, rows


def test_layout_by_hand():
    # 4 real tokens; chains of depth 2 on anchor 1, of depth 1 on anchor 2.
    anchor, depth, visible = parallel.chain_layout(4, [[1, 2], [1]])
    assert anchor.tolist() == [0, 1, 2, 3, 1, 2, 1] and depth.tolist() == [0, 0, 0, 0, 1, 1, 2]
    assert (anchor + depth).tolist() == [0, 1, 2, 3, 2, 3, 3]  # positions
    assert visible[3].tolist() == [True] * 4 + [False] * 3  # a real token: causal over real tokens only
    assert visible[4].tolist() == [True, True, False, False, True, False, False]  # (1, 1): x0, x1, itself
    assert visible[6].tolist() == [True, True, False, False, True, False, True]  # (1, 2): x0, x1, (1, 1), itself
    assert visible[5].tolist() == [True, True, True, False, False, True, False]  # (2, 1): x0..x2, itself


def test_nested_anchors_drop_by_depth():
    generator = torch.Generator().manual_seed(0)
    anchors = parallel.nested_anchors(list(range(100)), 7, 0.7, 0.2, generator)
    assert [len(a) for a in anchors] == [70, 49, 34, 24, 20, 20, 20]
    for shallow, deep in zip(anchors, anchors[1:]):
        assert set(deep) <= set(shallow)  # a kept chain is whole up to its depth
    assert parallel.nested_anchors([3, 5], 3, 1.0, 0.2, generator) == [[3, 5]] * 3


def test_slot_targets_shift_by_depth():
    layout = parallel.expanded([([7, 8, 9, 10], [[0, 1], [0]])], mask_id=1, dtype=torch.float32)
    labels = torch.tensor([[-100, 8, 9, 10]])
    # real slots predict the next token, (0, 1) predicts x2, (1, 1) x3, (0, 2) x3
    assert parallel.slot_targets(layout, labels).tolist() == [[8, 9, 10, -100, 9, 10, 10]]


def test_mask_token_choice(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    assert parallel.choose_mask_token(tok, None) == tok.pad_token_id != tok.eos_token_id
    assert parallel.choose_mask_token(tok, tok.eos_token) == tok.eos_token_id
    with pytest.raises(ValueError, match="'<nothing>' is not a token"):
        parallel.choose_mask_token(tok, "<nothing>")


@pytest.mark.parametrize("k", [2, 5])
def test_one_pass_proposals_are_the_drafts_own(models, k):
    """Every proposal of the one-pass measurement equals the draft's pass over prompt + y[:t] + k - 1 masks."""
    _, draft, _, rows = models
    items = [(r["prompt_ids"], r["new_ids"]) for r in rows]
    got = parallel_matches(draft, items, k=k, batch_size=2)
    mask_id = draft.config.pard_token
    for (prompt, y), result in zip(items, got):
        for t in range(len(y)):
            ids = torch.tensor([prompt + y[:t] + [mask_id] * (k - 1)])
            with torch.no_grad():
                own = draft(input_ids=ids).logits[0, -k:].argmax(-1).tolist()
            run = next((j for j in range(min(k, len(y) - t)) if own[j] != y[t + j]), min(k, len(y) - t))
            assert result["runs"][t] == run, (t, own, y[t : t + k])


@pytest.mark.parametrize("k", [1, 3, 6])
def test_walk_equals_decoding_loop(models, k):
    """The walk's steps from the one-pass runs are our decoding loop's, and the loop commits the target's output."""
    target, draft, tok, rows = models
    items = [(r["prompt_ids"], r["new_ids"]) for r in rows]
    forced = parallel_matches(draft, items, k=k, batch_size=3)
    deeper = 0
    for row, f in zip(rows, forced):
        walked = acceptance.walk_runs(f["runs"], k, N, row["finished"])
        real = parallel_generate(target, draft, row["prompt_ids"], k, N, [tok.eos_token_id])
        assert real["tokens"] == row["new_ids"]
        assert real["steps"] == walked
        deeper += sum(c > 2 for c, _ in walked)
    assert k < 3 or deeper > 0  # some steps accept beyond the first proposal: the masks are read


@pytest.fixture(scope="module")
def trained(models):
    """The draft after 60 steps of the pard loss on the target's own answers: (draft, losses, runs before)."""
    target, draft, tok, rows = models
    draft = _perturbed(draft, 0.0, 0)
    ids = [r["prompt_ids"] + r["new_ids"] for r in rows]
    width = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids]),
    }
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    items = [(r["prompt_ids"], r["new_ids"]) for r in rows]
    before = sum(sum(f["runs"]) for f in parallel_matches(draft, items, k=4, batch_size=5))
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    torch.manual_seed(0)
    history = []
    for _ in range(60):
        loss = losses.pard(draft, None, batch, 4096, settings={**SETTINGS, "keep": 1.0})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return draft.eval(), history, before


def test_pard_loss_trains_the_masks(models, trained):
    """A few steps of the pard loss on the target's own answers lower it, and the masks then propose better."""
    rows = models[3]
    draft, history, before = trained
    assert history[-1] < 0.5 * history[0]
    items = [(r["prompt_ids"], r["new_ids"]) for r in rows]
    after = sum(sum(f["runs"]) for f in parallel_matches(draft, items, k=4, batch_size=5))
    assert after > before


def test_an_end_of_text_inside_the_proposals_ends_the_output(models, trained):
    """A trained draft proposes past an end-of-text as readily as before it: the loop commits the target's output up
    to that end-of-text and no further, in the walk's steps."""
    target, _, tok, rows = models
    draft = trained[0]
    eos = rows[0]["new_ids"][2]  # a token the target emits: its output ends there
    target.generation_config.eos_token_id = eos
    try:
        ended = generate_batch(target, tok, PROMPTS, max_new_tokens=N, temperature=0.0)
    finally:
        target.generation_config.eos_token_id = tok.eos_token_id
    assert ended[0]["finished"]
    forced = parallel_matches(draft, [(r["prompt_ids"], r["new_ids"]) for r in ended], k=6, batch_size=5)
    for row, f in zip(ended, forced):
        real = parallel_generate(target, draft, row["prompt_ids"], 6, N, [eos])
        assert real["tokens"] == row["new_ids"]
        assert real["steps"] == acceptance.walk_runs(f["runs"], 6, N, row["finished"])


def test_draft_without_mask_token_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="pard_token"):
        parallel_matches(load_model(tiny_llama_dir), [([1, 2], [3])], k=2, batch_size=1)


def test_finetune_then_measure_a_parallel_draft(pair, outputs, sft_data_dir, tmp_path):  # noqa: F811 (fixtures)
    """Rule finetune with the pard loss saves the mask token; rule measure then walks the draft in parallel for every
    k, checks the walk against the decoding loop on n_check prompts, and costs a step as one pass of weight reads;
    the export serves it with vLLM's parallel drafting."""
    out = tmp_path / "dense_sd+pard"
    settings = {**FINETUNE_SETTINGS, "loss": "pard", "parallel": {**SETTINGS, "keep": 0.7}}
    finetune(pair[1], sft_data_dir, out, settings=settings, seed=0)
    tok = load_tokenizer(out)
    assert AutoConfig.from_pretrained(out).pard_token == tok.pad_token_id
    records = tmp_path / "results" / "records" / "toy" / "t" / "d"
    record_path = records / "dense_sd+pard-s0.json"
    labels = {**LABELS, "method": "dense_sd+pard", "sparsity": 0}
    result = ms.measure(pair[0], out, outputs, record_path, settings=MEASURE_SETTINGS, labels=labels, seed=0)
    by = {(r["temperature"], r["estimator"], r["k"]): r for r in result["records"]}
    assert sorted(by) == [(0.0, "parallel_walk", k) for k in range(1, 7)]  # greedy only, no autoregressive walk
    for k in range(1, 7):
        r = by[(0.0, "parallel_walk", k)]
        assert r["n_prompts"] == len(PROMPTS) and 1 <= r["mal"] <= k + 1
        assert r["draft_passes_per_step"] == 1 and r["draft_tokens_per_step"] == pytest.approx(r["mal"] - 1 + k)
        assert r["improvement_factor"] == pytest.approx(r["mal"] / (1 + (r["mal"] - 1 + k) * r["macs_ratio"]))
    checked = by[(0.0, "parallel_walk", 3)]
    assert checked["checked_prompts"] == MEASURE_SETTINGS["n_check"] and checked["checked_steps"] > 0
    assert checked["speedup"] == pytest.approx(checked["sd_tokens_per_s"] / checked["ar_tokens_per_s"])
    table = collect_measurements([record_path], tmp_path / "m.csv")
    row = table[table["k"] == 5].iloc[0]
    assert row["improvement_factor_bytes"] == pytest.approx(row["mal"] / (1 + row["weight_bytes_ratio"]))
    exported = export_draft(
        out, [record_path], tmp_path / "export", target=str(pair[0]), labels=labels, run_name="r", seed=0
    )
    spec = exported["vllm"]["speculative_config"]
    assert (
        spec["parallel_drafting"] is True
        and spec["method"] == "draft_model"
        and '"parallel_drafting": true' in (exported["vllm"]["serve"])
    )
    assert [h["estimator"] for h in exported["headline"]] == ["parallel_walk"]
    assert AutoConfig.from_pretrained(tmp_path / "export").pard_token == tok.pad_token_id
    # Against the draft it was made from, proposing one token per pass: paired over the same prompts.
    chained = {**labels, "method": "dense_sd"}
    ms.measure(pair[0], pair[1], outputs, records / "dense_sd-s0.json", settings=GREEDY, labels=chained, seed=0)
    compared = parallel_rows(tmp_path / "results").set_index("k")
    assert list(compared.index) == list(range(1, 7)) and compared["headline_k"].tolist() == [
        k == 3 for k in range(1, 7)
    ]
    for k, row in compared.iterrows():
        assert row["mal_ratio"] == pytest.approx(row["mal"] / row["chained_mal"])
        assert row["mal_ratio_ci_low"] <= row["mal_ratio"] <= row["mal_ratio_ci_high"]
        bytes_ratio = by[(0.0, "parallel_walk", k)]["weight_bytes_ratio"]
        assert row["bytes_factor"] == pytest.approx(row["mal"] / (1 + bytes_ratio))
        assert row["bytes_factor_ratio"] == pytest.approx(row["bytes_factor"] / row["chained_bytes_factor"])
    assert "| d | dense_sd | 0 | 3 |" in parallel_block(tmp_path / "results")
