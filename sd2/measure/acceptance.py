"""Exact greedy acceptance from one teacher-forced pass of the draft.

Greedy speculative decoding commits exactly the target's greedy continuation y. The
draft's greedy rollout from y[:t] agrees with y for as long as its teacher-forced argmax
at t, t+1, ... equals y there, so the match flags m[s] = [argmax q(. | prompt, y[:s]) ==
y[s]] of one forward pass over prompt + y give every verification step for every k:
the step at t accepts a = min(run of matches from t, drafted) tokens and commits a + 1.

`walk` follows transformers' assisted generation to the token (checked against it in
every greedy measurement job and in the tests): the draft proposes min(k, N - t - 1)
tokens, N = max_new_tokens, and when its proposal ends with an accepted end-of-text the
target commits that token itself.

Under sampling, `overlap` gives the expected acceptance per position, sum_x min(p, q) =
1 - total variation distance (Leviathan et al. 2023), along the same continuations.
"""

import torch


def match_runs(matches: list[bool]) -> list[int]:
    """runs[s] = number of consecutive matches starting at position s."""
    runs = [0] * (len(matches) + 1)
    for s in range(len(matches) - 1, -1, -1):
        runs[s] = runs[s + 1] + 1 if matches[s] else 0
    return runs[:-1]


def walk(matches: list[bool], k: int, max_new_tokens: int, ended_by_eos: bool) -> list[tuple[int, int]]:
    """(committed, drafted) target tokens per verification step, the last step included.

    `matches` has one flag per token of the target's continuation y (len(y) <= max_new_tokens);
    `ended_by_eos` says whether y's last token is the end-of-text token.
    """
    return walk_runs(match_runs(matches), k, max_new_tokens, ended_by_eos)


def walk_runs(runs: list[int], k: int, max_new_tokens: int, ended_by_eos: bool) -> list[tuple[int, int]]:
    """`walk` from runs[t]: how many of y[t], y[t+1], ... the draft's proposal at a step starting at
    t gets right (for a chain, the run of matches from t; for a tree or a draft head fed the
    target's states, whatever its own proposal there matched), one entry per token of y.
    """
    length, steps, t = len(runs), [], 0
    while t < length:
        drafted = max(0, min(k, max_new_tokens - t - 1))
        accepted = min(runs[t], drafted)
        if ended_by_eos and t + accepted == length:
            # The draft stops after proposing the end-of-text, and a fully accepted proposal that
            # ends generation gives its last token back to the target (transformers: n_matches -= 1).
            drafted, accepted = accepted, accepted - 1
        steps.append((accepted + 1, drafted))
        t += accepted + 1
    return steps


def _batches(items: list, batch_size: int):
    # Similar lengths together: less padding.
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    for b in range(0, len(order), batch_size):
        yield order[b : b + batch_size]


def _right_padded(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _continuation_logits(model, batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Per item, the logits that predict each token of its continuation: (len(y), vocab)."""
    ids, mask = _right_padded([p + y for p, y in batch], pad_id, model.device)
    # Right padding keeps every real position's prefix intact under the causal mask.
    logits = model(input_ids=ids, attention_mask=mask).logits
    return [logits[i, len(p) - 1 : len(p) - 1 + len(y)].float() for i, (p, y) in enumerate(batch)]


@torch.no_grad()
def teacher_forced_matches(
    draft, items: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int, progress=None
) -> list[dict]:
    """For each (prompt_ids, continuation_ids): match flags, the draft's top-2 logit gap and the rank of y per position.

    The gap tells a genuine disagreement from a floating-point near-tie when the walk is
    compared with incremental decoding. rank[s] = the number of tokens the draft puts before
    y[s] (a larger logit, or an equal one at a smaller id, argmax's tie order): rank 0 is a
    match, and a draft tree with b children per node holds y[s] iff rank < b (sd2.measure.trees).
    """
    out: list[dict | None] = [None] * len(items)
    for idx in _batches(items, batch_size):
        batch = [items[i] for i in idx]
        for i, (_, y), logits in zip(idx, batch, _continuation_logits(draft, batch, pad_id)):
            top = logits.topk(2, dim=-1).values if logits.shape[-1] > 1 else logits.repeat(1, 2)
            ids = torch.tensor(y, dtype=torch.long, device=logits.device)
            own = logits.gather(1, ids[:, None])
            earlier = torch.arange(logits.shape[-1], device=logits.device) < ids[:, None]
            rank = (logits > own).sum(-1) + ((logits == own) & earlier).sum(-1)
            out[i] = {
                "matches": (logits.argmax(-1).cpu() == torch.tensor(y)).tolist(),
                "gap": (top[:, 0] - top[:, 1]).cpu().tolist(),
                "rank": rank.cpu().tolist(),
            }
        if progress is not None:
            progress.update(len(idx))
    return out


@torch.no_grad()
def overlap(
    target, draft, items: list[tuple[list[int], list[int]]], *, temperature: float, pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """Per item: (sum over positions of sum_x min(p, q), positions), p and q at `temperature`.

    Both models must share the tokenizer (the same ids for prompt and continuation).
    """
    out: list[tuple[float, int] | None] = [None] * len(items)
    for idx in _batches(items, batch_size):
        batch = [items[i] for i in idx]
        for i, p_logits, q_logits in zip(
            idx, _continuation_logits(target, batch, pad_id), _continuation_logits(draft, batch, pad_id)
        ):
            p = torch.softmax(p_logits / temperature, -1)
            q = torch.softmax(q_logits / temperature, -1)
            out[i] = (float(torch.minimum(p, q).sum()), int(p.shape[0]))
    return out


def iid_mal(alpha: float, k: int) -> float:
    """Expected MAL if every draft token were accepted independently with probability alpha."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
