"""The teacher-forced walk against transformers' assisted generation, and the measure rule end to end.

Tiny random models with their layers re-initialised at a larger scale (at init scale a
tied random model just repeats its last token), a draft that is a perturbed copy of the
target (partial acceptance), real tokenizers.
"""

import copy
import json

import pytest
import torch
from datasets import Dataset
from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers

from sd2.generation import generate_batch
from sd2.masks import magnitude_mask
from sd2.measure import acceptance, continuations, trees
from sd2.measure import drafts as ms
from sd2.measure import speculative as sp
from sd2.models import decoder_linears, load_model, load_tokenizer
from sd2.report.collect import collect_measurements

PROMPTS = [
    "def add(a, b):\n    return",
    "for i in range(10):\n    print(",
    "import os\n\nclass Path:\n    def",
    "x = [1, 2",
    "while True:\n",
]
N = 16
SETTINGS = {
    "k_max": 6,
    "k": [3],
    "temperatures": [0.0, 1.0],
    "max_new_tokens": N,
    "n_prompts": None,
    "n_check": 3,
    "n_assisted": 2,
    "n_tvd": 4,
    "bootstrap": 1000,
    "warmup_prompts": 1,
    "batch_size": 4,
    "draft_kernel": "dense",
    "tree_budgets": [],
    "engine": {"name": "transformers", "gpu_memory_utilization": 0.9, "max_model_len": None},
}
LABELS = {"target": "t", "draft": "d", "method": "sd2", "sparsity": 50, "eval_set": "toy"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _rescaled(model, std, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, std)
    return model


def _perturbed(model, scale, seed):
    draft = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in draft.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(scale * torch.randn_like(module.weight))
    return draft


@pytest.fixture(scope="module")
def pair(tiny_llama_dir, tmp_path_factory):
    """(target dir, draft dir, tokenizer): a trained-looking random target and a perturbed copy, saved."""
    tok = load_tokenizer(tiny_llama_dir)
    target = _rescaled(load_model(tiny_llama_dir), 0.2, 0)
    draft = _perturbed(target, 0.02, 5)
    root = tmp_path_factory.mktemp("pair")
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "target", root / "draft", tok


def _walk_and_real(target, draft, tok, k, eos_ended_prompts=()):
    rows = generate_batch(target, tok, PROMPTS, max_new_tokens=N, temperature=0.0)
    items = [(r["prompt_ids"], r["new_ids"]) for r in rows]
    forced = acceptance.teacher_forced_matches(draft, items, pad_id=tok.pad_token_id, batch_size=2)
    runs = sp.assisted_runs(
        target, draft, tok, tok, [p for p, _ in items], k=k, temperature=0.0, max_new_tokens=N, seed=0
    )
    walks = [acceptance.walk(f["matches"], k, N, r["finished"]) for f, r in zip(forced, rows)]
    return rows, runs, walks


def test_walk_by_hand():
    m = [True, True, False, True, True, True, False, True]
    assert acceptance.match_runs(m) == [2, 1, 0, 3, 2, 1, 0, 1]
    # k = 2, plenty of budget: t=0 accepts 2 -> commits 3; t=3 accepts 2 -> 3; t=6 accepts 0 -> 1;
    # t=7 accepts 1 -> final 1 (budget)
    assert acceptance.walk(m, 2, max_new_tokens=100, ended_by_eos=False) == [(3, 2), (3, 2), (1, 2), (2, 2)]
    # max_new_tokens = len(y) = 8: the last steps propose only what fits, t=7 proposes 0 and commits 1
    assert acceptance.walk(m, 2, max_new_tokens=8, ended_by_eos=False) == [(3, 2), (3, 2), (1, 1), (1, 0)]
    # y ends with EOS and the draft matches it: it proposes up to the EOS, the target commits the EOS itself
    assert acceptance.walk([True, True, True], 5, max_new_tokens=100, ended_by_eos=True) == [(3, 3)]
    assert acceptance.walk([True] * 7, 3, max_new_tokens=100, ended_by_eos=True) == [(4, 3), (3, 3)]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_walk_equals_assisted_generation_step_by_step(pair, k):
    target_dir, draft_dir, tok = pair
    target, draft = load_model(target_dir), load_model(draft_dir)
    rows, runs, walks = _walk_and_real(target, draft, tok, k)
    assert all(r["new_tokens"] == N for r in rows)  # truncated by max_new_tokens
    accepted = []
    for row, run, walked in zip(rows, runs, walks):
        assert run["tokens"] == row["new_ids"]  # lossless
        assert run["steps"] == walked
        accepted += [c - 1 for c, _ in walked[:-1]]
    assert 0 < sum(accepted) < k * len(accepted)  # partial acceptance: the comparison has something to compare


def test_walk_equals_assisted_generation_with_eos_inside(pair):
    target_dir, draft_dir, tok = pair
    target, draft = load_model(target_dir), load_model(draft_dir)
    first = generate_batch(target, tok, PROMPTS[:1], max_new_tokens=N, temperature=0.0)[0]["new_ids"]
    for model in (target, draft):
        model.generation_config.eos_token_id = first[7]  # a token the target emits: generation ends there
    for k in (2, 5):
        rows, runs, walks = _walk_and_real(target, draft, tok, k)
        assert rows[0]["finished"] and rows[0]["new_tokens"] <= 8
        for row, run, walked in zip(rows, runs, walks):
            assert run["tokens"] == row["new_ids"]
            assert [c for c, _ in run["steps"]] == [c for c, _ in walked]
            assert run["steps"][:-1] == walked[:-1]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    Dataset.from_list([{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def outputs(pair, eval_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("outputs") / "outputs.json"
    continuations.target_outputs(pair[0], eval_dir, path, settings=SETTINGS, seed=0)
    return path


def test_target_outputs_file(outputs, pair):
    data = json.loads(outputs.read_text())
    assert [i["id"] for i in data["items"]] == [f"p{i}" for i in range(len(PROMPTS))]
    tok = pair[2]
    for item, prompt in zip(data["items"], PROMPTS):
        assert item["prompt_ids"] == tok(prompt)["input_ids"]
        assert len(item["continuation_ids"]) == N and not item["ended_by_eos"]
    timing = data["timing"]
    assert timing["timed_prompts"] == SETTINGS["n_check"] - SETTINGS["warmup_prompts"] and timing["ar_tokens_per_s"] > 0
    assert timing["batch1_differs"] == []  # batched left-padded greedy = batch-1 greedy here
    assert data["provenance"]["seed"] == 0


def test_measure_same_tokenizer(tmp_path, pair, outputs):
    out = tmp_path / "record.json"
    result = ms.measure(pair[0], pair[1], outputs, out, settings=SETTINGS, labels=LABELS, seed=0)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    by = {(r["temperature"], r["estimator"], r["k"]): r for r in result["records"]}
    walk = [by[(0.0, "teacher_forced_walk", k)] for k in range(1, 7)]
    for k, r in enumerate(walk, start=1):
        assert r["n_prompts"] == len(PROMPTS) and r["mal"] * r["n_steps"] == pytest.approx(r["accepted_tokens"])
        assert r["mal_ci_low"] <= r["mal"] <= r["mal_ci_high"] and 1 <= r["mal"] <= k + 1
        assert (
            sum(r["per_prompt"]["accepted_tokens"]) == r["accepted_tokens"]
            and sum(r["per_prompt"]["steps"]) == r["n_steps"]
        )
        assert r["improvement_factor"] == pytest.approx(r["mal"] / (1 + k * r["macs_ratio"]))
    checked = by[(0.0, "teacher_forced_walk", 3)]
    assert checked["checked_prompts"] == SETTINGS["n_check"] and checked["checked_steps"] > 0
    assert checked["draft_near_ties"] == 0 and checked["target_near_ties"] == 0
    assert checked["speedup"] == pytest.approx(checked["sd_tokens_per_s"] / checked["ar_tokens_per_s"])
    assert sum(r["best_k"] for r in walk) == 1
    sampled = by[(1.0, "assisted_generation", 3)]
    assert sampled["n_prompts"] == SETTINGS["n_assisted"] and sampled["mal"] >= 1
    tvd = [by[(1.0, "tvd_estimate", k)] for k in range(1, 7)]
    assert 0 < tvd[0]["alpha"] <= 1 and tvd[0]["alpha_ci_low"] <= tvd[0]["alpha"] <= tvd[0]["alpha_ci_high"]
    assert tvd[0]["mal"] == pytest.approx(1 + tvd[0]["alpha"])
    assert [r["mal"] for r in tvd] == sorted(r["mal"] for r in tvd)
    assert result["prompt_ids"] == [f"p{i}" for i in range(len(PROMPTS))]
    assert checked["provenance"]["settings"] == SETTINGS and checked["provenance"]["seed"] == 0
    table = collect_measurements([out], tmp_path / "m.csv")  # what the collect rule makes of it
    assert list(table.loc[table["headline_k"], "k"].unique()) == [3] and len(table) == len(result["records"])


def test_measure_times_a_csr_draft_and_cross_checks_it(tmp_path, pair, outputs):
    """draft_kernel csr: the timed runs use CSR layers and still commit, step by step, what the dense walk says."""
    draft = load_model(pair[1])
    with torch.no_grad():
        for linear in decoder_linears(draft).values():
            linear.weight.mul_(magnitude_mask(linear.weight, 0.7))
    draft.save_pretrained(tmp_path / "sparse")
    pair[2].save_pretrained(tmp_path / "sparse")
    settings = {**SETTINGS, "temperatures": [0.0], "draft_kernel": "csr"}
    result = ms.measure(
        pair[0], tmp_path / "sparse", outputs, tmp_path / "r.json", settings=settings, labels=LABELS, seed=0
    )
    checked = next(r for r in result["records"] if r["k"] == 3)
    assert checked["draft_kernel"] == "csr" and checked["draft_kernel_layers"] == len(decoder_linears(draft))
    assert checked["checked_prompts"] == SETTINGS["n_check"] and checked["draft_near_ties"] == 0
    assert checked["sd_tokens_per_s"] > 0
    table = collect_measurements([tmp_path / "r.json"], tmp_path / "m.csv")
    assert set(table["draft_kernel"]) == {"csr"}


def test_identical_draft_accepts_everything(tmp_path, pair, outputs):
    settings = {**SETTINGS, "temperatures": [0.0]}
    result = ms.measure(pair[0], pair[0], outputs, tmp_path / "r.json", settings=settings, labels=LABELS, seed=0)
    for r in result["records"]:
        assert r["mal"] == r["k"] + 1 and r["acceptance_rate"] == 1.0, r["k"]
        assert r["accepted_length_histogram"][-1] == r["n_steps"]


def test_cross_check_disagreement_names_prompt_and_step(tmp_path, pair, outputs, monkeypatch):
    real = acceptance.walk

    def off_by_one(matches, k, max_new_tokens, ended_by_eos):
        steps = real(matches, k, max_new_tokens, ended_by_eos)
        return [(steps[0][0] + 1, steps[0][1])] + steps[1:] if steps[0][0] <= k else steps

    monkeypatch.setattr(acceptance, "walk", off_by_one)
    with pytest.raises(AssertionError, match=r"prompt id 'p0', k=3: .* step 0"):
        ms.measure(
            pair[0],
            pair[1],
            outputs,
            tmp_path / "r.json",
            settings={**SETTINGS, "temperatures": [0.0]},
            labels=LABELS,
            seed=0,
        )
    assert not (tmp_path / "r.json").exists()


def test_near_tie_is_counted_not_fatal(pair):
    item = {"id": "x"}
    walked = [(2, 3), (1, 3)]
    assert ms.check_steps(item, walked, walked, [1.0, 1.0, 1.0], 3)
    assert not ms.check_steps(item, [(1, 3), (2, 3)], walked, [1e-6, 1.0, 1.0], 3)
    with pytest.raises(AssertionError, match="step 0"):
        ms.check_steps(item, [(1, 3), (2, 3)], walked, [0.5, 1.0, 1.0], 3)


def test_measure_different_tokenizers(tmp_path, tiny_qwen_dir, tiny_llama_draft_dir, eval_dir):
    outputs = tmp_path / "outputs.json"
    continuations.target_outputs(tiny_qwen_dir, eval_dir, outputs, settings=SETTINGS, seed=0)
    result = ms.measure(
        tiny_qwen_dir, tiny_llama_draft_dir, outputs, tmp_path / "r.json", settings=SETTINGS, labels=LABELS, seed=0
    )
    estimators = {(r["temperature"], r["estimator"]) for r in result["records"]}
    assert estimators == {(0.0, "uag_walk"), (0.0, "tli_walk"), (1.0, "assisted_generation")}
    # The fixtures' models were saved without training: no precision to name.
    assert all(r["draft_training_precision"] is None and "target_training_precision" in r for r in result["records"])
    greedy = [r for r in result["records"] if r["temperature"] == 0]
    for record in greedy:
        assert record["decoding_path"] == "uag" and not record["same_tokenizer"]
        # Every prompt under the exact walks; the loops that run both models agree on the checked ones.
        assert record["n_prompts"] == len(result["prompt_ids"])
    checked = [r for r in greedy if r["k"] in SETTINGS["k"]]
    assert {r["estimator"] for r in checked} == {"uag_walk", "tli_walk"}
    for record in checked:
        assert record["checked_prompts"] + record["draft_near_ties"] + record["target_near_ties"] == SETTINGS["n_check"]
    tli = {r["k"] for r in greedy if r["estimator"] == "tli_walk"}
    assert tli == set(range(1, SETTINGS["k_max"] + 1)) and all(
        r["mal_vllm"] >= 1 for r in greedy if r["estimator"] == "tli_walk"
    )


def test_mismatched_continuation_length_is_an_error(tmp_path, pair, outputs):
    with pytest.raises(ValueError, match="continuations of 16 tokens"):
        ms.measure(
            pair[0],
            pair[1],
            outputs,
            tmp_path / "r.json",
            settings={**SETTINGS, "max_new_tokens": 32},
            labels=LABELS,
            seed=0,
        )


def test_output_that_is_not_the_cached_continuation_names_the_prompt(pair, outputs):
    item = json.loads(outputs.read_text())["items"][1]
    target = load_model(pair[0])
    assert ms.check_output(target, item, item["continuation_ids"], 3)
    wrong = list(item["continuation_ids"])
    wrong[4] = (wrong[4] + 1) % 100
    with pytest.raises(AssertionError, match=r"prompt id 'p1' \(k=3\) at new token 4"):
        ms.check_output(target, item, wrong, 3)


def test_measure_tree_budgets(tmp_path, pair, outputs):
    """tree_walk records next to the chain's, from the same teacher-forced pass, each checked against the tree loop."""
    settings = {**SETTINGS, "temperatures": [0.0], "k": [3], "tree_budgets": [1, 3, 6, 10]}
    out = tmp_path / "r.json"
    result = ms.measure(pair[0], pair[1], outputs, out, settings=settings, labels=LABELS, seed=0)
    chain = {r["k"]: r for r in result["records"] if r["estimator"] == "teacher_forced_walk"}
    tree = {r["k"]: r for r in result["records"] if r["estimator"] == "tree_walk"}
    assert sorted(tree) == [1, 3, 6, 10]
    for budget, r in tree.items():
        shape = tuple(int(b) for b in r["tree_branching"].split(","))
        assert r["tree_budget"] == budget and r["tree_depth"] == len(shape) and r["tree_nodes"] <= budget
        assert r["tree_nodes"] == trees.tree_nodes(shape) and r["tree_verify_width"] == r["tree_nodes"] + 1
        assert r["tree_nodes_expanded"] == trees.expanded_nodes(shape)
        assert r["improvement_factor"] == pytest.approx(r["mal"] / (1 + r["tree_nodes_expanded"] * r["macs_ratio"]))
        assert r["mal_ci_low"] <= r["mal"] <= r["mal_ci_high"] and 1 <= r["mal"] <= len(shape) + 1
        assert len(r["acceptance_by_position"]) == len(shape)
        assert r["checked_prompts"] == SETTINGS["n_check"] and r["checked_steps"] > 0
        assert r["draft_near_ties"] == 0 and r["target_near_ties"] == 0
        if budget in chain and shape == trees.chain(budget):  # the chain itself: the same numbers as the walk's
            assert r["mal"] == chain[budget]["mal"] and r["per_prompt"] == chain[budget]["per_prompt"]
    assert tree[1]["tree_branching"] == "1" and tree[1]["mal"] == chain[1]["mal"]
    # A tree holds its chain of as many nodes where the shape is no wider: never below it here.
    assert tree[6]["mal"] >= chain[1]["mal"] and any(r["tree_branching"].split(",")[0] != "1" for r in tree.values())
    assert sum(r["best_k"] for r in tree.values()) == 1 and sum(r["best_k"] for r in chain.values()) == 1
    table = collect_measurements([out], tmp_path / "m.csv")
    rows = table[table["estimator"] == "tree_walk"]
    assert len(rows) == 4 and not rows["headline_k"].any()  # a tree's k is its budget, not a headline k
    assert list(rows["tree_branching"]) == [tree[b]["tree_branching"] for b in (1, 3, 6, 10)]
    assert table.loc[table["estimator"] == "teacher_forced_walk", "tree_budget"].isna().all()


def test_default_measure_has_no_tree_records(tmp_path, pair, outputs):
    settings = {**SETTINGS, "temperatures": [0.0], "tree_budgets": []}
    result = ms.measure(pair[0], pair[1], outputs, tmp_path / "r.json", settings=settings, labels=LABELS, seed=0)
    assert {r["estimator"] for r in result["records"]} == {"teacher_forced_walk"}


def test_check_every_k_cell_checks_every_k(tmp_path, pair, outputs, tiny_qwen_dir, tiny_llama_draft_dir, eval_dir):
    """The check_every_k cell is checked at every k on its prompts, both across and within a tokenizer."""
    cell = {key: LABELS[key] for key in ("draft", "method", "sparsity", "eval_set")}
    settings = {**SETTINGS, "temperatures": [0.0], "check_every_k": {**cell, "prompts": 4}}
    same = ms.measure(pair[0], pair[1], outputs, tmp_path / "a.json", settings=settings, labels=LABELS, seed=0)
    qwen_outputs = tmp_path / "qwen.json"
    continuations.target_outputs(tiny_qwen_dir, eval_dir, qwen_outputs, settings=SETTINGS, seed=0)
    across = ms.measure(
        tiny_qwen_dir, tiny_llama_draft_dir, qwen_outputs, tmp_path / "b.json", settings=settings, labels=LABELS, seed=0
    )
    every_k = set(range(1, SETTINGS["k_max"] + 1))
    # The UAG walk runs at the headline k only (its loop check on the cell's prompts there).
    checked = (("teacher_forced_walk", same, every_k), ("tli_walk", across, every_k), ("uag_walk", across, {3}))
    for estimator, result, ks in checked:
        records = [r for r in result["records"] if r["estimator"] == estimator]
        assert {r["k"] for r in records} == ks
        for r in records:
            assert r["checked_prompts"] + r["draft_near_ties"] + r["target_near_ties"] == 4
    other = ms.check_plan(settings, {**LABELS, "method": "dense"})
    assert other == {k: SETTINGS["n_check"] for k in SETTINGS["k"]}


def test_training_precision_follows_the_checkpoints_a_draft_was_made_from(tmp_path):
    from sd2.provenance import provenance, training_precision

    def stage(name, precision=None, **settings):
        (tmp_path / name).mkdir()
        info = {**provenance(seed=0, **settings), **({"precision": precision} if precision else {})}
        (tmp_path / name / "provenance.json").write_text(json.dumps(info))
        return str(tmp_path / name)

    base = stage("base", "bf16", model="tiny-draft")
    pruned = stage("pruned", model=base, sparsity=50)
    tuned = stage("tuned", "fp32", init=pruned)
    assert training_precision(tuned) == "bf16+fp32"
    assert training_precision(base) == "bf16"
    assert training_precision(tmp_path / "nowhere") is None


@pytest.mark.parametrize("key", ["uag_eval_sets", "uag_methods"])
def test_uag_walk_runs_on_the_eval_sets_and_methods_named(tmp_path, tiny_qwen_dir, tiny_llama_draft_dir, eval_dir, key):
    outputs = tmp_path / "outputs.json"
    continuations.target_outputs(tiny_qwen_dir, eval_dir, outputs, settings=SETTINGS, seed=0)
    settings = {**SETTINGS, "temperatures": [0.0], key: ["elsewhere"]}
    result = ms.measure(
        tiny_qwen_dir, tiny_llama_draft_dir, outputs, tmp_path / "r.json", settings=settings, labels=LABELS, seed=0
    )
    assert {r["estimator"] for r in result["records"]} == {"tli_walk"}


def test_uag_check_reruns_with_the_cache_dropped_where_the_kept_loop_left_the_walk(
    tmp_path, tiny_qwen_dir, tiny_llama_draft_dir, eval_dir, monkeypatch
):
    """The cache-kept loop's steps made to differ on the first prompt (as transformers' cropping defect does): that
    prompt leaves engine_same_steps, is run again with the draft's cache dropped, and still counts as checked."""
    outputs = tmp_path / "outputs.json"
    continuations.target_outputs(tiny_qwen_dir, eval_dir, outputs, settings=SETTINGS, seed=0)
    real, dropped_prompts = ms.assisted_runs, []

    def kept_defect(target, draft, target_tok, draft_tok, prompts, **kwargs):
        runs = real(target, draft, target_tok, draft_tok, prompts, **kwargs)
        if AssistedCandidateGeneratorDifferentTokenizers._update_past_and_masks.__name__ == "without_cache":
            dropped_prompts.extend(prompts)
        elif kwargs["temperature"] == 0:
            runs[0] = {**runs[0], "steps": [(1, kwargs["k"])] + runs[0]["steps"]}
        return runs

    monkeypatch.setattr(ms, "assisted_runs", kept_defect)
    settings = {**SETTINGS, "temperatures": [0.0]}
    result = ms.measure(
        tiny_qwen_dir, tiny_llama_draft_dir, outputs, tmp_path / "r.json", settings=settings, labels=LABELS, seed=0
    )
    (uag,) = [r for r in result["records"] if r["estimator"] == "uag_walk"]
    first = json.loads(outputs.read_text())["items"][0]["prompt_ids"]
    assert first in dropped_prompts and len(dropped_prompts) == SETTINGS["n_check"] - uag["engine_same_steps"]
    assert uag["checked_prompts"] + uag["draft_near_ties"] + uag["target_near_ties"] == SETTINGS["n_check"]
