"""SKD's on-policy batches (Xu et al. 2024, arXiv 2410.11325): before each step the draft answers
the batch's prompts, the target replacing every draft token outside its top-K, and the loss
(sd2.drafts.losses.skd) is computed on those interleaved responses. Used for every loss the
registry marks on_policy; settings finetune.skd_top_k, skd_decoding, skd_max_new_tokens."""

import torch

from sd2 import training
from sd2.drafts.losses import shared_vocabulary


def replace_outside_top_k(proposals: torch.Tensor, teacher_logits: torch.Tensor, top_k: int, replacements):
    """(tokens, replaced): each proposal kept where the teacher ranks it in its top K, else its replacement.

    A proposal's rank is the number of tokens with a strictly higher teacher logit, so a tie
    counts in the proposal's favour and K >= the vocabulary size replaces nothing.
    """
    proposed = teacher_logits.gather(-1, proposals.unsqueeze(-1))
    replaced = (teacher_logits > proposed).sum(-1) >= top_k
    return torch.where(replaced, replacements, proposals), replaced


def pick(logits: torch.Tensor, greedy: bool) -> torch.Tensor:
    """One token per row: the argmax, or a draw from softmax(logits) (temperature 1)."""
    if greedy:
        return logits.argmax(-1)
    return torch.distributions.Categorical(logits=logits.float()).sample()


def _step(model, ids, mask, positions, cache):
    """(next-token logits, KV cache) after feeding `ids`; only the last position's logits are computed."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1], out.past_key_values


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of the prompts as one left-padded batch."""
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def interleaved_responses(
    student, teacher, prompts: list[list[int]], limits: list[int], *, top_k: int, greedy: bool, stop_ids, pad_id: int
) -> tuple[list[list[int]], int]:
    """SKD's interleaved sampling (Xu et al. 2024, Algorithm 1) for a batch of prompts.

    At each position the student proposes a token (its argmax, or a draw from it); where
    the teacher does not rank it in its top `top_k` the teacher's own token (argmax, or a
    draw) replaces it, and both models continue from the corrected prefix. Row i stops
    after a token of `stop_ids` (kept) or `limits[i]` tokens. One left-padded batch, each
    model with its own KV cache. Returns (responses, number of tokens replaced).
    """
    device = next(student.parameters()).device
    n = len(prompts)
    ids, mask = left_padded(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    vocab = shared_vocabulary(student, teacher)
    s_logits, s_cache = _step(student, ids, mask, positions, None)
    t_logits, t_cache = _step(teacher, ids, mask, positions, None)
    limit = torch.tensor(limits, device=device)
    stop = torch.tensor(list(stop_ids), device=device)
    done = limit <= 0
    lengths = torch.zeros(n, dtype=torch.long, device=device)
    tokens, replaced_total = [], 0
    for _ in range(max(limits) if not bool(done.all()) else 0):
        s_logits, t_logits = s_logits[:, :vocab], t_logits[:, :vocab]
        token, replaced = replace_outside_top_k(pick(s_logits, greedy), t_logits, top_k, pick(t_logits, greedy))
        active = ~done
        token = torch.where(active, token, torch.full_like(token, pad_id))
        replaced_total += int((replaced & active).sum())
        lengths += active.long()
        tokens.append(token)
        done = done | torch.isin(token, stop) | (lengths >= limit)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        s_logits, s_cache = _step(student, token[:, None], mask, positions, s_cache)
        t_logits, t_cache = _step(teacher, token[:, None], mask, positions, t_cache)
    new = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in range(n)]
    return [row[:length] for row, length in zip(new, lengths.tolist())], replaced_total


def skd_batch(model, teacher, batch: dict, *, settings: dict, stop_ids, pad_id: int) -> tuple[dict, int, int]:
    """(batch, tokens generated, tokens replaced): `batch`'s prompts with the draft's interleaved responses.

    The prompt of a row is what precedes its first labelled token. A response stops at
    skd_max_new_tokens (null: the length of the row's response in the data, so the data's
    length limit holds) and where prompt + response would pass seq_len.
    """
    prompts, limits = [], []
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        length = int(attention.sum())
        labelled = (labels[:length] != -100).nonzero()
        start = int(labelled[0]) if len(labelled) else length
        prompts.append(ids[:start].tolist())
        limit = settings["skd_max_new_tokens"] or len(labelled)
        limits.append(max(0, min(limit, settings["seq_len"] - start)))
    responses, replaced = interleaved_responses(
        model,
        teacher,
        prompts,
        limits,
        top_k=settings["skd_top_k"],
        greedy=settings["skd_decoding"] == "greedy",
        stop_ids=stop_ids,
        pad_id=pad_id,
    )
    examples = [{"input_ids": p + r, "labels": [-100] * len(p) + r} for p, r in zip(prompts, responses)]
    device = batch["input_ids"].device
    new = {k: v.to(device) for k, v in training.collate(examples, pad_id).items()}
    return new, sum(map(len, responses)), replaced


def skd_batches(model, teacher, batches, *, settings: dict, stop_ids, pad_id: int, counts: dict):
    """training.train's batches for skd: each data batch's prompts answered by the current draft (on-policy).

    The draft generates in eval mode (no dropout, KV cache), then goes back to training;
    `counts` accumulates generated and replaced tokens for the provenance.
    """
    for batch in batches:
        was_training = model.training
        model.eval()
        new, generated, replaced = skd_batch(model, teacher, batch, settings=settings, stop_ids=stop_ids, pad_id=pad_id)
        model.train(was_training)
        counts["generated_tokens"] += generated
        counts["replaced_tokens"] += replaced
        yield new


def skd_record(settings: dict, counts: dict) -> dict:
    """What the provenance's `loss` adds for an on-policy loss: SKD's settings and its tokens' counts."""
    generated = counts["generated_tokens"]
    return {
        "top_k": settings["skd_top_k"],
        "decoding": settings["skd_decoding"],
        "max_new_tokens": settings["skd_max_new_tokens"],
        "generated_tokens": generated,
        "replaced_fraction": counts["replaced_tokens"] / generated if generated else None,
    }
