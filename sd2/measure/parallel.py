"""Exact greedy acceptance of a parallel draft (sd2.parallel) from one pass, and our decoding loop with it.

A verification step that starts at continuation token t reads the draft once: the context
prompt + y[:t] and k - 1 mask tokens. Its proposals d_0..d_{k-1} agree with the target's greedy
continuation y for as long as d_j = y[t+j]; the step accepts that run (at most the tokens drafted)
and commits one more. Proposal j depends only on the context and masks 1..j, so the proposals of
a smaller k are the first k of these, and one pass with a full mask chain hung on every position
of the continuation (sd2.parallel.chain_layout) gives runs[t] for every t and every k <= k_max;
acceptance.walk_runs turns them into steps as for any chain draft.

`parallel_generate` is the decoding loop itself, KV caches kept for both models (sd2.measure.trees'
CachedModel, a chain being a tree with one path): per step one draft pass over the new real tokens
and k - 1 masks, then one target pass over the proposals.
The measurement checks the walk against it step by step and times it.
"""

import time

import torch

from sd2 import parallel
from sd2.chunked_loss import output_logits
from sd2.measure.acceptance import _batches
from sd2.measure.trees import CachedModel


def item_anchors(n_prompt: int, n_continuation: int, k: int) -> list[list[int]]:
    """Per depth j = 1..k-1, the anchors whose j-th mask predicts a continuation token: the last real token
    before continuation token t, for every t with t + j inside the continuation."""
    return [[n_prompt - 1 + t for t in range(n_continuation - j)] for j in range(1, k)]


def proposal_runs(proposals: torch.Tensor, gaps: torch.Tensor, y: list[int]) -> tuple[list[int], list[float]]:
    """(runs, gaps) from one item's (len(y), k) proposals and their top-2 logit gaps: runs[t] = how many of
    y[t], y[t+1], ... the proposals of the step at t get right; gaps[t] = the smallest gap up to and including
    the first wrong proposal (where a near-tie could change that run)."""
    target = torch.tensor(y, dtype=torch.long)
    n, k = proposals.shape
    index = torch.arange(n)[:, None] + torch.arange(k)[None, :]
    inside = index < n
    right = (proposals == target[index.clamp(max=n - 1)]) & inside
    runs = right.long().cumprod(1).sum(1)
    compared = torch.arange(k)[None, :] <= runs[:, None]
    gap = torch.where(compared & inside, gaps, torch.full_like(gaps, float("inf"))).min(1).values
    return runs.tolist(), gap.tolist()


@torch.no_grad()
def parallel_matches(draft, items: list[tuple[list[int], list[int]]], *, k: int, batch_size: int, progress=None):
    """For each (prompt_ids, continuation_ids): {"runs", "gap"} of the draft's k parallel proposals at every
    continuation position (proposal_runs), from one forward pass per batch over prompt + continuation and a
    chain of k - 1 masks on every position; the output layer runs only where a proposal is read."""
    mask_id = parallel.mask_token(draft)
    if mask_id is None:
        raise ValueError(
            "the draft has no mask token (its config's pard_token): it was not trained to draft in parallel"
        )
    out: list[dict | None] = [None] * len(items)
    for idx in _batches(items, batch_size):
        batch = [items[i] for i in idx]
        rows = [(p + y[:-1], item_anchors(len(p), len(y), k)) for p, y in batch]
        layout, hidden = parallel.hidden_states(draft, rows, mask_id, draft.dtype)
        for row, i, (p, y) in zip(range(len(idx)), idx, batch):
            t = layout["anchor"][row] - (len(p) - 1)
            depth = layout["depth"][row]
            read = (depth >= 0) & (t >= 0) & (t < len(y))
            logits = output_logits(draft, hidden[row][read]).float()
            top = logits.topk(2, dim=-1)
            proposals = torch.full((len(y), k), -1, dtype=torch.long)
            gaps = torch.full((len(y), k), float("inf"))
            where = (t[read].cpu(), depth[read].cpu())
            proposals[where] = top.indices[:, 0].cpu()
            gaps[where] = (top.values[:, 0] - top.values[:, 1]).cpu()
            runs, gap = proposal_runs(proposals, gaps, y)
            out[i] = {"runs": runs, "gap": gap}
        if progress is not None:
            progress.update(len(idx))
    return out


def path_of(n: int) -> tuple[list[int], list[int]]:
    """(parents, depths) of n tokens in a row after the prefix: a draft tree with one path."""
    return list(range(-1, n - 1)), list(range(1, n + 1))


@torch.no_grad()
def parallel_generate(target, draft, prompt_ids: list[int], k: int, max_new_tokens: int, eos_ids) -> dict:
    """Greedy speculative decoding with a parallel draft, batch size 1: {"tokens", "steps" ((committed, drafted)
    per step), "seconds"}. The step rules are acceptance.walk_runs': min(k, max_new_tokens - t - 1) tokens drafted,
    and a fully accepted proposal that ends with the end-of-text gives that token back to the target."""
    mask_id, eos = parallel.mask_token(draft), set(eos_ids)
    target_cache, draft_cache = CachedModel(target), CachedModel(draft)
    tokens, steps = [], []
    start = time.perf_counter()
    while len(tokens) < max_new_tokens:
        context = prompt_ids + tokens
        drafted = max(0, min(k, max_new_tokens - len(tokens) - 1))
        proposals = []
        if drafted:
            masks = [mask_id] * (drafted - 1)
            logits = draft_cache.forward(context, masks, *path_of(len(masks)), last=len(context) + len(masks))
            proposals = logits[-drafted:].argmax(-1).tolist()
            draft_cache.keep(len(context))
        logits = target_cache.forward(context, proposals, *path_of(drafted), last=len(context) + drafted)
        greedy = logits[-(drafted + 1) :].argmax(-1).tolist()
        accepted = next((j for j in range(drafted) if proposals[j] != greedy[j]), drafted)
        # Proposals after an end-of-text are past the end of the output, whatever they say.
        accepted = next((j + 1 for j in range(accepted) if proposals[j] in eos), accepted)
        if accepted and proposals[accepted - 1] in eos:
            drafted, accepted = accepted, accepted - 1
        committed = proposals[:accepted] + [greedy[accepted]]
        target_cache.keep(len(context) + accepted)
        tokens += committed
        steps.append((len(committed), drafted))
        if committed[-1] in eos:
            break
    return {"tokens": tokens, "steps": steps, "seconds": time.perf_counter() - start}
