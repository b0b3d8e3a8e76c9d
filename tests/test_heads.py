"""Draft heads (ReDrafter, MoA) on a tiny random target: training, rollouts, decoding loop, records, MACs.

The target is the tiny Llama with its layers re-initialised at a larger scale (at init scale it
just repeats its last token), as in tests/test_measure.py; its self-distilled data and cached
greedy continuations are made here by the real rules' functions.
"""

import json

import pytest
import torch
from datasets import Dataset

from sd2 import cli
from sd2.drafters import heads
from sd2.drafts.distill import self_distill
from sd2.masks import apply_masks
from sd2.measure import continuations
from sd2.models import load_model, load_tokenizer
from sd2.report.collect import MEASUREMENT_COLUMNS, collect_measurements
from sd2.report.comparisons import collect_comparisons
from sd2.report.markdown import summary_markdown

PROMPTS = [
    "def add(a, b):\n    return",
    "for i in range(10):\n    print(",
    "import os\n\nclass Path:\n    def",
    "x = [1, 2",
    "while True:\n",
    'def f(x):\n    """Square."""\n',
]
N = 12
MEASURE = {
    "k_max": 4,
    "k": [2, 4],
    "temperatures": [0.0],
    "max_new_tokens": N,
    "n_prompts": None,
    "n_check": 4,
    "n_assisted": 0,
    "n_tvd": 0,
    "bootstrap": 200,
    "warmup_prompts": 1,
    "batch_size": 5,
}
TRAIN = {
    "steps": 30,
    "sparse_steps": 10,
    "batch_size": 3,
    "lr": 1e-2,
    "warmup": 3,
    "seq_len": 64,
    "depth": 3,
    "max_examples": None,
    "log_every": 1,
}
ENGINE = {"name": "transformers", "gpu_memory_utilization": 0.9, "max_model_len": None}
SIZES = {"redrafter": {"layers": 1}, "moa": {"layers": 1, "width": 0.5, "attention_heads": None}}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target_dir(tiny_llama_dir, tmp_path_factory):
    model, tok = load_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.2)
        # Sharper logits: a teacher with a clear distribution to distill, not a near-uniform one.
        model.model.norm.weight.mul_(8.0)
    out = tmp_path_factory.mktemp("head_target")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def distilled(target_dir, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("head_prompts")
    rows = [{"id": f"p{i}", "prompt": p, "response": "x"} for i, p in enumerate(PROMPTS * 2)]
    Dataset.from_list(rows).save_to_disk(str(prompts))
    out = tmp_path_factory.mktemp("head_distill") / "distill"
    settings = dict(
        max_new_tokens=24,
        temperature=1.0,
        batch_size=6,
        max_prompts=None,
        max_prompt_tokens=None,
        shard_batches=20,
        chat={},
        engine=ENGINE,
    )
    self_distill(target_dir, prompts, out, settings=settings, seed=0)
    return out


@pytest.fixture(scope="module")
def outputs(target_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("head_eval")
    Dataset.from_list([{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]).save_to_disk(str(root / "eval"))
    path = root / "outputs.json"
    continuations.target_outputs(target_dir, root / "eval", path, settings={**MEASURE, "engine": ENGINE}, seed=0)
    return path


@pytest.fixture(scope="module")
def trained(target_dir, distilled, tmp_path_factory):
    """Each head trained through the CLI (train-head), as the rule runs it."""
    root = tmp_path_factory.mktemp("heads")
    for method, size in SIZES.items():
        cli.main(
            ["train-head", "--target", str(target_dir), "--data", str(distilled), "--head", f"{method}-small"]
            + ["--size", json.dumps(size), "--settings", json.dumps(TRAIN), "--out", str(root / method)]
            + (["--beam-width", "3"] if method == "redrafter" else [])
        )
    return root


def _train_redrafter(target_dir, data, tmp_path, size, layers=1, **sparse):
    return heads.train_head(
        target_dir,
        data,
        tmp_path / "head",
        head_name=f"redrafter-{size}",
        size={"layers": layers},
        settings=TRAIN,
        chat_settings=None,
        seed=0,
        beam_width=1,
        trust_remote_code=False,
        dtype="auto",
        **sparse,
    )


@pytest.mark.parametrize("method", list(SIZES))
def test_training_lowers_the_distillation_loss(trained, method):
    info = json.loads((trained / method / heads.HEAD_CONFIG).read_text())
    losses = [row["train_loss"] for row in info["history"]]
    assert len(losses) == TRAIN["steps"] and all(row["positions"] > 0 for row in info["history"])
    # Mean of the last 5 steps against the first 5: batches differ, single steps are noisy.
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses
    assert info["method"] == method and info["provenance"]["settings"]["depth"] == TRAIN["depth"]


def _head(target_dir, trained, method):
    target = load_model(target_dir).eval()
    return target, heads.load_head(trained / method, target)[0]


@pytest.mark.parametrize("method,beams", [("redrafter", 1), ("redrafter", 3), ("moa", 1)])
def test_batched_rollouts_equal_one_start_at_a_time(target_dir, trained, outputs, method, beams):
    target, head = _head(target_dir, trained, method)
    item = continuations.load(outputs)["items"][2]
    prompt, y = item["prompt_ids"], item["continuation_ids"]
    with torch.no_grad():
        feats = head.features(target(torch.tensor([prompt + y]), output_hidden_states=True).hidden_states)
        starts = torch.arange(1, len(y))
        ctx = len(prompt) + starts - 1
        last = torch.tensor(y)[starts - 1]
        tokens, margins = heads.propose(head, feats, torch.zeros_like(starts), ctx, last, 3, beams)
        for i in range(len(starts)):
            one, m = heads.propose(
                head, feats, torch.zeros(1, dtype=torch.long), ctx[i : i + 1], last[i : i + 1], 3, beams
            )
            assert torch.equal(one[0], tokens[i]), i
            assert torch.allclose(m[0], margins[i], atol=1e-5), i
    assert tokens.shape == (len(y) - 1, beams, 3)


def test_beam_search_by_hand():
    """Two steps, two beams, vocabulary 3, over a toy head whose log-probs depend only on the last token."""

    class Toy(torch.nn.Module):
        vocab = 3
        table = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.45, 0.45, 0.1]]).log()

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def begin(self, feats, item, ctx_len, last):
            return last

        def logits(self, state):
            return self.table[state]

        def advance(self, state, tokens):
            return tokens

        def index(self, state, idx):
            return state[idx]

    tokens, margins = heads.propose(Toy(), None, None, None, torch.tensor([0]), 2, 2)
    # Step 1 from token 0: beams 0 (0.5) and 1 (0.3). Step 2: 0->0 0.25, 1->2 0.24, 0->1 0.15, ...
    assert tokens[0].tolist() == [[0, 0], [1, 2]]
    assert margins[0].tolist() == pytest.approx(
        [torch.tensor(0.3 / 0.2).log().item(), torch.tensor(0.24 / 0.15).log().item()]
    )
    assert heads.matched(tokens, torch.tensor([[1, 2]])).tolist() == [2]
    assert heads.matched(tokens, torch.tensor([[0, 1]])).tolist() == [1]


@pytest.mark.parametrize("method,beams", [("redrafter", 1), ("redrafter", 3), ("moa", 1)])
def test_decoding_is_lossless_and_equals_the_walk(target_dir, trained, outputs, method, beams):
    target, head = _head(target_dir, trained, method)
    items = continuations.load(outputs)["items"]
    ks = [1, 2, 4]
    multi = 0  # steps that accepted drafted tokens: the comparison is not between two all-rejecting runs
    for item in items:
        runs = heads.item_runs(head, target, item["prompt_ids"], item["continuation_ids"], ks, beams, batch_size=4)
        for k in ks:
            real = heads.decode(head, target, item["prompt_ids"], k=k, beams=beams, max_new_tokens=N, eos_ids=[])
            assert real["tokens"] == item["continuation_ids"], (item["id"], k)
            walked = heads.walk(runs[k]["runs"], k, N, item["ended_by_eos"])
            assert [c for c, _ in real["steps"]] == [c for c, _ in walked], (item["id"], k)
            assert real["steps"][0] == (1, 0) and sum(c for c, _ in real["steps"]) == N
            multi += sum(c > 1 for c, _ in real["steps"])
    assert multi > 0


def test_eos_inside_an_accepted_draft_ends_the_walk_as_decoding_does(target_dir, trained, outputs):
    """The cached continuation cut at its 6th token, taken as the end-of-text: decoding stops at it exactly."""
    target, head = _head(target_dir, trained, "redrafter")
    item = continuations.load(outputs)["items"][0]
    y = item["continuation_ids"][:6]
    eos = y[-1]
    if eos in y[:-1]:
        pytest.skip("the cut token also occurs earlier in this continuation")
    runs = heads.item_runs(head, target, item["prompt_ids"], y, [4], 3, batch_size=4)
    real = heads.decode(head, target, item["prompt_ids"], k=4, beams=3, max_new_tokens=N, eos_ids=[eos])
    assert real["tokens"] == y
    walked = heads.walk(runs[4]["runs"], 4, N, True)
    assert [c for c, _ in real["steps"]] == [c for c, _ in walked]


def test_macs_by_hand(target_dir):
    target = load_model(target_dir)  # hidden 32, 2 layers, vocabulary 512
    assert (target.config.hidden_size, target.config.num_hidden_layers, target.config.vocab_size) == (32, 2, 512)
    lm_head = 512 * 32
    redrafter = heads.build_head("redrafter", {"layers": 2}, target)
    moa = heads.build_head("moa", {"layers": 1, "width": 0.5, "attention_heads": None}, target)
    # Trained weights are non-zero (ReDrafter's ResBlocks start at zero, which would count as pruned).
    for head in (redrafter, moa):
        for module in head.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight)
    # U, W: 2 x 32x32; two ResBlocks 64x64; projection 64x32; the shared lm_head.
    assert redrafter.macs_per_token() == 2 * 1024 + 2 * 4096 + 2048 + lm_head
    assert (moa.width, moa.heads) == (16, 2)  # half the target's hidden size and of its 4 heads
    # input (32+16)x16; layer: 8 x 16x16 attention maps + 3 x 16x32 MLP; output 16x32;
    # LSA over 3 levels: 3 x (32x16 + 4 x 16x16); the shared lm_head.
    layer = 8 * 256 + 3 * 512
    assert moa.macs_per_token() == 48 * 16 + layer + 512 + 3 * (512 + 1024) + lm_head
    # Pruned heads cost their non-zeros: half of every own linear layer, the shared lm_head dense.
    for head in (redrafter, moa):
        dense = head.macs_per_token()
        apply_masks(head, heads.magnitude_masks(head, 0.5))
        assert head.macs_per_token() == lm_head + (dense - lm_head) // 2
        assert head.macs_per_token(dense=True) == dense


def test_sparse_head_keeps_its_masks_and_lowers_the_loss(target_dir, trained, distilled, tmp_path):
    out = tmp_path / "redrafter-small-s50"
    cli.main(
        ["train-head", "--target", str(target_dir), "--data", str(distilled), "--head", "redrafter-small"]
        + ["--size", json.dumps(SIZES["redrafter"]), "--settings", json.dumps(TRAIN), "--out", str(out)]
        + ["--init", str(trained / "redrafter"), "--sparsity", "50"]
    )
    info = json.loads((out / heads.HEAD_CONFIG).read_text())
    target, head = _head(target_dir, tmp_path, out.name)
    # Every own linear layer exactly half zeros after training (the zero-initialised ResBlock rounds the same way).
    for module in head.modules():
        if isinstance(module, torch.nn.Linear):
            assert int((module.weight == 0).sum()) == round(module.weight.numel() * 0.5)
    assert info["sparsity"] == 50 and info["macs_per_token"] == head.macs_per_token() < info["dense_macs_per_token"]
    dense = json.loads((trained / "redrafter" / heads.HEAD_CONFIG).read_text())
    assert info["dense_history"] == dense["history"] and len(info["history"]) == TRAIN["sparse_steps"]
    losses = [row["train_loss"] for row in info["history"]]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    with pytest.raises(ValueError, match="is a redrafter-small head"):
        _train_redrafter(
            target_dir, distilled, tmp_path, "large", layers=2, init_dir=trained / "redrafter", sparsity=50
        )


def test_measure_head_records_have_the_chain_columns(target_dir, trained, outputs, tmp_path):
    out = tmp_path / "records" / "redrafter-s0.json"
    labels = {"target": "t", "draft": "redrafter-small", "method": "redrafter", "sparsity": 0, "eval_set": "toy"}
    cli.main(
        ["measure-head", "--target", str(target_dir), "--head", str(trained / "redrafter")]
        + ["--target-outputs", str(outputs), "--settings", json.dumps(MEASURE), "--out", str(out)]
        + ["--labels", json.dumps(labels)]
    )
    result = json.loads(out.read_text())
    records = result["records"]
    assert [r["k"] for r in records] == list(range(1, MEASURE["k_max"] + 1))
    for r in records:
        assert r["estimator"] == "rollout_walk" and r["beam_width"] == 3 and r["method"] == "redrafter"
        assert r["draft_macs_per_token"] == 3 * r["head_macs_per_token"]
        assert 1 <= r["mal"] <= r["k"] + 1 and r["mal"] * r["n_steps"] == pytest.approx(r["accepted_tokens"])
        assert r["improvement_factor"] == pytest.approx(r["mal"] / (1 + r["k"] * r["macs_ratio"]))
    for k in MEASURE["k"]:
        checked = records[k - 1]
        assert checked["checked_prompts"] == MEASURE["n_check"] and checked["checked_steps"] > 0
        assert checked["draft_near_ties"] == checked["target_near_ties"] == 0
    assert records[-1]["mal"] > 1.0, records[-1]["mal"]
    table = collect_measurements([out], tmp_path / "m.csv")
    assert list(table.columns) == MEASUREMENT_COLUMNS and len(table) == len(records)
    assert set(table.loc[table["headline_k"], "k"]) == set(MEASURE["k"])
    # The rest of rule collect takes head records too.
    summary = summary_markdown(table, collect_comparisons([out], tmp_path / "c.csv"))
    assert "redrafter-small" in summary


def test_moa_refuses_beams(target_dir, trained, outputs, tmp_path):
    with pytest.raises(ValueError, match="only ReDrafter proposes beams"):
        heads.measure_head(
            target_dir,
            trained / "moa",
            outputs,
            tmp_path / "r.json",
            settings=MEASURE,
            labels={},
            seed=0,
            trust_remote_code=False,
            dtype="auto",
            beam_width=2,
        )


def test_config_heads_default_to_none_and_sizes_are_checked():
    import yaml

    from sd2.config import ConfigError, validate

    config = validate(yaml.safe_load(open("config/test.yaml")))
    assert config["heads"]["methods"] == [] and config["heads"]["sizes"]["moa"]["small"]["width"] == 0.25
    bad = yaml.safe_load(open("config/test.yaml"))
    bad["heads"] = {"methods": ["moa"], "sizes": {"moa": {"small-1": {"layers": 1}}}}
    with pytest.raises(ConfigError, match="heads.sizes.moa"):
        validate(bad)
    bad["heads"] = {"methods": ["redrafter"], "sizes": {"redrafter": {"small": {"layers": 1, "width": 0.5}}}}
    with pytest.raises(ConfigError, match="heads.sizes.redrafter.small"):
        validate(bad)


def test_training_on_data_that_is_not_self_distilled_is_refused(target_dir, tmp_path):
    data = tmp_path / "original"
    Dataset.from_list([{"id": "p0", "prompt": "x", "response": "y"}]).save_to_disk(str(data))
    with pytest.raises(ValueError, match="not a self-distilled dataset"):
        _train_redrafter(target_dir, data, tmp_path, "small")
