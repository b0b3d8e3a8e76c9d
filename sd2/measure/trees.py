"""Static draft-token trees for any chain drafter: exact greedy acceptance offline, and a decoding loop that proves it.

A tree is given by its branching per depth (b_1, ..., b_D): the root is the last committed
token and every node at depth d-1 gets the draft's top-b_d tokens as children. Greedy
verification accepts the longest root path whose every token is the target's argmax after
its parent, and commits it plus the target's token after it (the bonus).

Offline: greedy decoding commits the target's greedy continuation y whatever the draft
does, so the only root path that can be accepted at a step starting at t is y[t], y[t+1],
...; the draft's distribution at the node y[t:t+j] is its teacher-forced distribution at
position t+j. The step therefore accepts the largest d with rank(y[t+j]) < b_{j+1} for all
j < d, rank(s) = the rank of y[s] among the draft's teacher-forced logits at s. One
teacher-forced pass (sd2.measure.acceptance.teacher_forced_matches, which returns the ranks)
gives every tree exactly, and acceptance.walk_runs with k = D turns those runs into steps
(its caps at max_new_tokens and end-of-text are what `tree_generate` does).

Cost: the draft runs one forward per node it expands (the root and every node at depths
1..D-1, `expanded_nodes`), so the theoretical improvement factor is
MAL / (1 + expanded * MACs_draft / MACs_target), the chain's 1 + k·c for (1, ..., 1); the
target verifies nodes + 1 tokens in one forward (`verify_width`).

Shape from a node budget n (`shape_for_budget`): the branching with at most n nodes that
maximises the expected accepted length sum_d prod_{j<=d} F(b_j), F(b) = the share of the
draft's ranks below b, ranks treated as independent across positions (the model of Sequoia,
Chen et al. 2024, restricted to one branching per depth).
"""

from collections import defaultdict
from functools import cache

import numpy as np
import torch
from transformers import DynamicCache

from sd2.generation import model_eos_ids
from sd2.measure import acceptance

RULE = (
    "static tree, one branching per depth; for a budget of n nodes, the branching with at most n nodes that "
    "maximises sum_d prod_{j<=d} F(b_j), F(b) = share of this record's teacher-forced ranks below b (ranks "
    "treated as independent; ties go to the smaller branching); the chain when no rank is below n"
)


def format_branching(branching) -> str:
    return ",".join(str(b) for b in branching)


def depth_widths(branching) -> list[int]:
    """Nodes at depths 1..D."""
    return [int(w) for w in np.cumprod(branching)] if len(branching) else []


def tree_nodes(branching) -> int:
    """Nodes of the tree, the root excluded: the draft tokens the target verifies."""
    return sum(depth_widths(branching))


def nodes_within(branching, depth: int) -> int:
    """Nodes of the tree cut at `depth` (the first `depth` levels)."""
    return sum(depth_widths(branching)[:depth])


def expanded_nodes(branching) -> int:
    """Nodes the draft runs a forward on to expand them: the root and every node above the last depth."""
    return 1 + nodes_within(branching, len(branching) - 1) if len(branching) else 0


def verify_width(branching) -> int:
    """Tokens the target verifies in one forward: the root and every node."""
    return tree_nodes(branching) + 1


def chain(k: int) -> tuple[int, ...]:
    return (1,) * k


def rank_cdf(ranks: list[list[int]], budget: int) -> list[float]:
    """F[b] for b = 0..budget: the share of all positions whose rank is below b."""
    pooled = np.concatenate([np.asarray(r, dtype=np.int64) for r in ranks]) if ranks else np.zeros(0, np.int64)
    if not len(pooled):
        return [0.0] * (budget + 1)
    counts = np.bincount(np.minimum(pooled, budget), minlength=budget + 1)
    return [0.0] + (np.cumsum(counts)[:budget] / len(pooled)).tolist()


def expected_accepted(branching, cdf: list[float]) -> float:
    """Expected accepted draft tokens per step if ranks were independent with distribution `cdf`."""
    return float(sum(np.cumprod([cdf[b] for b in branching]))) if len(branching) else 0.0


def shape_for_budget(budget: int, cdf: list[float]) -> tuple[int, ...]:
    """The branching with at most `budget` nodes that maximises `expected_accepted` (dynamic programming).

    best(rem, width) = max over b of F(b) * (1 + best(rem - width*b, width*b)): the value of
    a subtree depends only on the nodes left and the width of the level above it.
    """
    if budget < 1:
        raise ValueError(f"tree budget must be at least 1 node, got {budget}")
    if len(cdf) <= budget:
        raise ValueError(f"rank distribution covers ranks below {len(cdf) - 1}, the budget is {budget}")

    @cache
    def best(rem: int, width: int) -> tuple[float, tuple[int, ...]]:
        value, shape = 0.0, ()
        for b in range(1, rem // width + 1):
            if cdf[b] <= 0:
                continue
            rest_value, rest = best(rem - width * b, width * b)
            candidate = cdf[b] * (1 + rest_value)
            if candidate > value * (1 + 1e-12):  # strictly better: ties keep the smaller branching
                value, shape = candidate, (b, *rest)
        return value, shape

    shape = best(budget, 1)[1]
    return shape or chain(budget)


def tree_runs(ranks: list[int], branching) -> list[int]:
    """runs[t] = the depth the tree accepts at a step starting at t: the largest d with
    ranks[t + j] < branching[j] for every j < d (at most the end of y)."""
    r = np.asarray(ranks, dtype=np.int64)
    inside = np.zeros((len(branching), len(r)), dtype=bool)
    for j, b in enumerate(branching):
        inside[j, : max(0, len(r) - j)] = r[j:] < b
    return np.cumprod(inside, axis=0).sum(axis=0).tolist() if len(branching) else [0] * len(r)


def tree_walk(ranks: list[int], branching, max_new_tokens: int, ended_by_eos: bool) -> list[tuple[int, int]]:
    """(committed, drafted) per verification step of greedy tree decoding, drafted = nodes of the tree
    the step builds (cut to the depth that still fits under max_new_tokens, as in acceptance.walk)."""
    steps = acceptance.walk_runs(tree_runs(ranks, branching), len(branching), max_new_tokens, ended_by_eos)
    return [(committed, nodes_within(branching, depth)) for committed, depth in steps]


# ---------------------------------------------------------------- the decoding loop


def tree_visibility(n_prefix: int, parents: list[int]) -> torch.Tensor:
    """(n, n) bool over prefix + nodes: the prefix is causal, a node sees the prefix, its ancestors and itself."""
    n = n_prefix + len(parents)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[n_prefix:, n_prefix:] = False
    for i, parent in enumerate(parents):
        row = n_prefix + i
        allowed[row, row] = True
        while parent >= 0:
            allowed[row, n_prefix + parent] = True
            parent = parents[parent]
    return allowed


class CachedModel:
    """A model that reads prefix + tree nodes, computing each token once while it stays: a KV cache cropped
    back to the committed prefix after every step.

    `forward` feeds the tokens from the cache's end up to `last` (of prefix + nodes) in one call,
    with a 4D mask cut from `tree_visibility` (transformers' Llama and Qwen2 take a 4D mask as
    given: masking_utils returns it as-is) and node i at position len(prefix) - 1 + depths[i],
    the rotary position it would have on its own root path.
    """

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config)

    def forward(self, prefix, tokens, parents, depths, last: int) -> torch.Tensor:
        """Logits after each token fed (prefix + tokens)[cached:last], as float (rows, vocab)."""
        first = self.cache.get_seq_length()
        ids = (prefix + tokens)[first:last]
        positions = (list(range(len(prefix))) + [len(prefix) - 1 + d for d in depths])[first:last]
        visible = tree_visibility(len(prefix), parents)[first:last, :last]
        dtype, device = self.model.dtype, self.model.device
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=mask[None, None].to(device),
            position_ids=torch.tensor([positions], device=device),
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[0].float()

    def keep(self, n: int) -> None:
        """Drop the cached tokens after the first n (the nodes of the step just verified)."""
        extra = self.cache.get_seq_length() - n
        if extra > 0:
            self.cache.crop(-extra)


@torch.no_grad()
def tree_generate(
    target, draft, prompt_ids: list[int], branching, max_new_tokens: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """Greedy speculative decoding with a static draft tree, batch size 1: (new tokens, (committed, drafted) per step).

    Per step the draft builds the tree level by level (one forward per level, the top-b_d
    children of every node of the level above), cut to the depth that still fits under
    max_new_tokens; the target scores the root and all nodes in one forward with a tree
    attention mask; the longest root path of target argmaxes is committed with the target's
    token after it. A path that reaches an end-of-text token stops there, and the target
    commits that token itself, as transformers' assisted generation does. Both models keep
    a KV cache of the committed tokens; tokens committed by a step are fed again at the next
    one (their cached copies sat among rejected nodes).
    """
    eos = model_eos_ids(target)
    big, small = CachedModel(target), CachedModel(draft)
    seq, new, steps = list(prompt_ids), [], []
    while len(new) < max_new_tokens:
        depth = max(0, min(len(branching), max_new_tokens - len(new) - 1))
        tokens, parents, depths, frontier = [], [], [], [-1]  # -1: the root
        for d in range(depth):
            # The uncommitted prefix (ending at the root) at the first level, then the level above.
            logits = small.forward(seq, tokens, parents, depths, last=len(seq) + len(tokens))
            rows = logits[-len(frontier) :]
            level = []
            for node, row in zip(frontier, rows):
                for token in row.topk(branching[d]).indices.tolist():
                    tokens.append(token)
                    parents.append(node)
                    depths.append(d + 1)
                    level.append(len(tokens) - 1)
            frontier = level
        small.keep(len(seq))
        # Row r of `best`: the target's argmax after the root (r = 0) or after node r - 1.
        best = big.forward(seq, tokens, parents, depths, last=len(seq) + len(tokens))
        best = best[best.shape[0] - len(tokens) - 1 :].argmax(-1).tolist()
        big.keep(len(seq))
        children = defaultdict(list)
        for i, parent in enumerate(parents):
            children[parent].append(i)
        node, committed = -1, []
        while True:
            child = next((c for c in children[node] if tokens[c] == best[node + 1]), None)
            if child is None:
                committed.append(best[node + 1])  # the target's own token after the accepted path
                break
            committed.append(tokens[child])
            node = child
            if tokens[child] in eos:
                break
        steps.append((len(committed), len(tokens)))
        seq += committed
        new += committed
        if committed[-1] in eos:
            break
    return new, steps


# ---------------------------------------------------------------- cross-check against the walk


@torch.no_grad()
def boundary_gaps(draft, prompt_ids: list[int], continuation: list[int], positions: list[tuple[int, int]]) -> list:
    """For each (position s, branching b): how far y[s]'s logit is from the top-b boundary, teacher-forced.

    y[s] is inside the top b when its rank is below b; the gap to the logit that decides it
    (the b-th largest when it is outside, the (b+1)-th when it is inside) says whether that
    membership is a floating-point near-tie.
    """
    if not positions:
        return []
    ids = torch.tensor([prompt_ids + continuation], device=draft.device)
    logits = draft(input_ids=ids).logits[0, len(prompt_ids) - 1 :].float()
    gaps = []
    for s, b in positions:
        top = logits[s].topk(min(b + 1, logits.shape[-1])).values
        own = logits[s, continuation[s]]
        inside = int((logits[s] > own).sum()) < b
        edge = top[min(b, len(top) - 1)] if inside else top[b - 1]
        gaps.append(abs(float(own - edge)))
    return gaps


def check_steps(draft, item: dict, real: list, walked: list, branching, *, near_tie: float, budget: int) -> bool:
    """True if the loop's per-step committed counts equal the walk's; False where they first differ at a
    draft near-tie of a top-b boundary; else raise naming prompt, budget and step."""
    got, want = [c for c, _ in real], [c for c, _ in walked]
    if got == want:
        return True
    step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    start = sum(want[:step])
    span = max(got[step] if step < len(got) else 1, want[step] if step < len(want) else 1)
    y = item["continuation_ids"]
    positions = [(start + j, branching[j]) for j in range(min(span, len(branching))) if start + j < len(y)]
    gaps = boundary_gaps(draft, item["prompt_ids"], y, positions)
    if gaps and min(gaps) < near_tie:
        return False
    raise AssertionError(
        f"prompt id {item['id']!r}, tree budget {budget} (branching {format_branching(branching)}): the tree "
        f"decoding loop and the rank walk disagree at verification step {step} (new token {start}): the loop "
        f"committed {got[step : step + 3]}, the walk {want[step : step + 3]}"
    )
