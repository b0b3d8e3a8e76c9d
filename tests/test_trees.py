"""sd2.measure.trees: static draft-token trees, the exact rank walk against our own tree decoding loop.

Tiny random models (tests/conftest.py): a target with its layers re-initialised at a larger
scale (at init scale a tied random model just repeats its last token, test_measure.py), and
as drafts the target itself (everything accepted), a perturbed copy (partial acceptance) and
an unrelated random model (almost nothing accepted).
"""

import itertools

import numpy as np
import pytest
from test_measure import PROMPTS, _perturbed, _rescaled

from sd2.generation import generate_batch
from sd2.measure import acceptance, trees
from sd2.models import load_model, load_tokenizer

N = 16
SHAPES = [(1, 1, 1), (2, 2, 1), (3, 1, 1, 1), (4,), (2, 1, 1, 1, 1, 1)]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- shapes and counts


def test_node_counts():
    assert trees.depth_widths((4, 2, 1)) == [4, 8, 8]
    assert trees.tree_nodes((4, 2, 1)) == 20 and trees.verify_width((4, 2, 1)) == 21
    assert trees.expanded_nodes((4, 2, 1)) == 1 + 4 + 8  # the root, then every non-leaf level
    assert trees.nodes_within((4, 2, 1), 2) == 12 and trees.nodes_within((4, 2, 1), 0) == 0
    for k in range(1, 6):  # the chain: k nodes, k draft forwards, the chain's 1 + k*c
        assert trees.tree_nodes(trees.chain(k)) == trees.expanded_nodes(trees.chain(k)) == k
    assert trees.format_branching((4, 2, 1)) == "4,2,1"


def test_rank_cdf():
    cdf = trees.rank_cdf([[0, 0, 1], [3, 7]], budget=4)
    assert cdf == [0.0, 0.4, 0.6, 0.6, 0.8]  # ranks below 0, 1, 2, 3, 4


def _all_shapes(budget, width=1, prefix=()):
    if prefix:
        yield prefix
    for b in range(1, budget // width + 1):
        yield from _all_shapes(budget - width * b, width * b, prefix + (b,))


@pytest.mark.parametrize("budget", [1, 2, 5, 8, 13])
@pytest.mark.parametrize(
    "cdf",
    [
        [0.0, 0.6, 0.8, 0.85, 0.88, 0.9, 0.91] + [0.92] * 10,
        [0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98] + [0.99] * 8,
        [0.0, 0.9] + [0.95] * 15,
    ],
)
def test_shape_for_budget_is_the_best_shape_under_the_budget(budget, cdf):
    shape = trees.shape_for_budget(budget, cdf)
    assert trees.tree_nodes(shape) <= budget
    best = max(trees.expected_accepted(s, cdf) for s in _all_shapes(budget))
    assert trees.expected_accepted(shape, cdf) == pytest.approx(best, rel=1e-9)


def test_shape_for_budget_edge_cases():
    assert trees.shape_for_budget(6, [0.0] + [1.0] * 6) == trees.chain(6)  # a perfect draft: the longest chain
    assert trees.shape_for_budget(6, [0.0] * 7) == trees.chain(6)  # nothing ever ranks within the budget
    # A weak top-1 with a strong top-4: branch wide at the root.
    assert trees.shape_for_budget(4, [0.0, 0.1, 0.2, 0.3, 1.0]) == (4,)
    with pytest.raises(ValueError, match="at least 1 node"):
        trees.shape_for_budget(0, [0.0, 1.0])
    with pytest.raises(ValueError, match="budget is 5"):
        trees.shape_for_budget(5, [0.0, 1.0])


# ---------------------------------------------------------------- the rank walk


def test_tree_runs_by_hand():
    ranks = [0, 1, 0, 3, 0, 2]
    assert trees.tree_runs(ranks, (1, 1, 1)) == [1, 0, 1, 0, 1, 0]
    assert trees.tree_runs(ranks, (2, 1, 1)) == [1, 2, 1, 0, 1, 0]
    assert trees.tree_runs(ranks, (4, 2, 1)) == [3, 2, 1, 2, 1, 1]
    assert trees.tree_runs(ranks, (4, 4, 4)) == [3, 3, 3, 3, 2, 1]  # at most the end of y


def test_tree_walk_counts_nodes_and_caps_like_the_chain_walk():
    # Step at t=0 accepts depth 3 (ranks 0,1,0 under 4,2,1): commits 4; t=4 fits depth min(3, 8-4-1) = 3,
    # accepts 1 of y[4:]: commits 2; t=6 fits depth 1: accepts 0; t=7 fits 0.
    steps = trees.tree_walk([0, 1, 0, 3, 0, 5, 9, 0], (4, 2, 1), max_new_tokens=8, ended_by_eos=False)
    assert steps == [(4, 20), (2, 20), (1, 4), (1, 0)]


@pytest.mark.parametrize("seed", range(20))
def test_the_chain_tree_is_the_chain_walk(seed):
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, 30))
    ranks = rng.choice([0, 0, 0, 1, 2, 7], size=length).tolist()
    matches = [r == 0 for r in ranks]
    for k, max_new, eos in itertools.product((1, 2, 5), (length, length + 3), (False, True)):
        assert trees.tree_walk(ranks, trees.chain(k), max_new, eos) == acceptance.walk(matches, k, max_new, eos)


# ---------------------------------------------------------------- the decoding loop on tiny models


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tiny_llama_draft_dir):
    """(tokenizer, target, {name: draft}) sharing one tokenizer."""
    tok = load_tokenizer(tiny_llama_dir)
    target = _rescaled(load_model(tiny_llama_dir), 0.2, 0)
    drafts = {
        "identical": target,
        "perturbed": _perturbed(target, 0.02, 5),
        "random": load_model(tiny_llama_draft_dir),
    }
    return tok, target, drafts


def _continuations(target, tok):
    rows = generate_batch(target, tok, PROMPTS, max_new_tokens=N, temperature=0.0)
    return [(r["prompt_ids"], r["new_ids"]) for r in rows], [r["finished"] for r in rows]


def _loop_equals_walk(target, draft, tok, shapes):
    """Per shape: the loop is lossless and commits the walk's counts step by step; returns accepted draft tokens."""
    items, ended = _continuations(target, tok)
    forced = acceptance.teacher_forced_matches(draft, items, pad_id=tok.pad_token_id, batch_size=2)
    for f in forced:
        assert [r == 0 for r in f["rank"]] == f["matches"]
    accepted = {}
    for shape in shapes:
        accepted[shape] = []
        for (prompt, y), f, eos in zip(items, forced, ended):
            tokens, steps = trees.tree_generate(target, draft, prompt, shape, N)
            walked = trees.tree_walk(f["rank"], shape, N, eos)
            assert tokens == y, shape  # lossless
            assert [c for c, _ in steps] == [c for c, _ in walked], (shape, f["rank"])
            assert steps[:-1] == walked[:-1]  # the same trees too, cut at the same depths
            accepted[shape] += [c - 1 for c, _ in walked[:-1]]
    return accepted


def test_loop_equals_walk_identical_draft(models):
    tok, target, drafts = models
    accepted = _loop_equals_walk(target, drafts["identical"], tok, SHAPES)
    for shape, counts in accepted.items():
        # Every step accepts the whole depth but where max_new_tokens cuts the tree.
        assert counts.count(len(shape)) >= len(counts) - len(PROMPTS) * len(shape), shape


def test_loop_equals_walk_perturbed_draft(models):
    tok, target, drafts = models
    accepted = _loop_equals_walk(target, drafts["perturbed"], tok, SHAPES)
    chain, tree = sum(accepted[(1, 1, 1)]), sum(accepted[(2, 2, 1)])
    assert 0 < chain < 3 * len(accepted[(1, 1, 1)])  # partial acceptance: there is something to compare
    assert tree >= chain  # (2, 2, 1) holds the chain (1, 1, 1)


def test_loop_equals_walk_random_draft(models):
    tok, target, drafts = models
    _loop_equals_walk(target, drafts["random"], tok, [(1, 1), (4, 2)])


def test_loop_equals_walk_with_eos_inside(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    target = _rescaled(load_model(tiny_llama_dir), 0.2, 0)
    draft = _perturbed(target, 0.02, 5)
    first = generate_batch(target, tok, PROMPTS[:1], max_new_tokens=N, temperature=0.0)[0]["new_ids"]
    for model in (target, draft):
        model.generation_config.eos_token_id = first[5]  # a token the target emits: generation ends there
    items, ended = _continuations(target, tok)
    assert ended[0] and len(items[0][1]) <= 6
    _loop_equals_walk(target, draft, tok, [(1, 1, 1, 1, 1, 1, 1, 1), (2, 2, 1), (3, 1, 1, 1)])
    _loop_equals_walk(target, target, tok, [(1, 1, 1, 1, 1, 1, 1, 1), (2, 1, 1)])  # the EOS itself accepted


def test_check_steps_names_the_disagreement(models):
    tok, target, drafts = models
    items, _ = _continuations(target, tok)
    prompt, y = items[0]
    item = {"id": "p0", "prompt_ids": prompt, "continuation_ids": y}
    walked = trees.tree_walk([0] * len(y), (2, 1), N, False)
    assert trees.check_steps(target, item, walked, walked, (2, 1), near_tie=1e-4, budget=4)
    off = [(walked[0][0] - 1, walked[0][1])] + walked[1:]
    with pytest.raises(AssertionError, match=r"prompt id 'p0', tree budget 4 \(branching 2,1\).* step 0"):
        trees.check_steps(target, item, off, walked, (2, 1), near_tie=1e-4, budget=4)
    # Within a huge near-tie threshold every boundary is a tie: counted, not fatal.
    assert not trees.check_steps(target, item, off, walked, (2, 1), near_tie=1e9, budget=4)


def test_loop_equals_walk_on_qwen2(tiny_qwen_dir):
    """Qwen2 takes the same 4D tree mask (and its own tokenizer); a perturbed copy as the draft."""
    tok = load_tokenizer(tiny_qwen_dir)
    target = _rescaled(load_model(tiny_qwen_dir), 0.2, 0)
    accepted = _loop_equals_walk(target, _perturbed(target, 0.02, 5), tok, [(1, 1, 1), (3, 2)])
    assert sum(accepted[(1, 1, 1)]) > 0
