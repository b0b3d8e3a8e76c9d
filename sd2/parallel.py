"""Parallel drafting (PARD, An et al. 2025, arXiv 2504.18583): a draft that proposes k tokens in one pass.

After the context x_0..x_a the draft reads k - 1 copies of one mask token at positions a+1..a+k-1;
its logits at x_a predict x_{a+1}, and at the j-th mask x_{a+1+j}. The mask token is one id of the
draft's own vocabulary, named in its config as `pard_token` (the key vLLM's parallel drafting reads),
so the draft keeps the target's vocabulary size.

Training and the exact measurement both read many such proposals in one forward pass: real tokens
x_0..x_{n-1}, and *chains* of mask tokens hung on anchors. The chain on anchor a has masks (a, 1..d)
at positions a+1..a+d; mask (a, j) sees the real tokens x_0..x_a and the masks (a, 1..j), nothing
else, which is exactly what it would see in the draft's own pass after x_a. Training keeps a random
part of the chains, nested by depth (PARD's conditional drop-token: the chains kept at depth j are a
subset of those kept at depth j - 1, a fraction max(keep**j, keep_min) of the anchors); the
measurement hangs a full chain on every position of the target's continuation.
"""

import torch

MASK_KEY = "pard_token"


def mask_token(model) -> int | None:
    """The draft's mask token id (its config's `pard_token`), None for a draft that proposes one token per pass."""
    return getattr(model.config, MASK_KEY, None)


def choose_mask_token(tokenizer, name: str | None) -> int:
    """The id of `name` in the tokenizer, or by default its padding token: a row of the embedding that no
    training reads as input (padding is masked out), so it is free to learn the mask. Raises where neither
    gives a token other than end-of-text, naming the setting."""
    if name is not None:
        token = tokenizer.convert_tokens_to_ids(name)
        if token is None or token == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token) != name:
            raise ValueError(f"finetune.parallel.mask_token '{name}' is not a token of the draft's tokenizer")
        return token
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or pad == eos:
        raise ValueError(
            "parallel drafting needs a mask token: the draft's tokenizer has no padding token apart from "
            "end-of-text, so name an unused one in finetune.parallel.mask_token"
        )
    return pad


def nested_anchors(candidates: list[int], depth: int, keep: float, keep_min: float, generator) -> list[list[int]]:
    """anchors[j - 1]: the anchors whose chain reaches depth j, j = 1..depth; each a random subset of the one
    before, of max(keep**j, keep_min) x len(candidates) anchors (keep = 1: every chain whole)."""
    anchors, kept = [], torch.tensor(candidates, dtype=torch.long)
    for j in range(1, depth + 1):
        n = min(len(kept), round(len(candidates) * max(keep**j, keep_min)))
        kept = kept[torch.randperm(len(kept), generator=generator)[:n]].sort().values
        anchors.append(kept.tolist())
    return anchors


def chain_layout(n_real: int, anchors: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, depth, visible) of every slot: the n_real real tokens (anchor = own index, depth 0), then the
    masks of depth 1 on anchors[0], of depth 2 on anchors[1], ...; visible[q, s]: slot q attends to slot s.
    A slot's position is anchor + depth."""
    anchor = torch.cat([torch.arange(n_real), *(torch.tensor(a, dtype=torch.long) for a in anchors)])
    depth = torch.cat(
        [torch.zeros(n_real, dtype=torch.long), *(torch.full((len(a),), j + 1) for j, a in enumerate(anchors))]
    )
    key_real = depth[None, :] == 0
    sees_real = key_real & (anchor[None, :] <= anchor[:, None])
    sees_chain = ~key_real & (anchor[None, :] == anchor[:, None]) & (depth[None, :] <= depth[:, None])
    return anchor, depth, sees_real | sees_chain


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., q, s) bool -> 0 where visible, the dtype's minimum elsewhere: a 4D mask transformers' Llama and
    Qwen2 take as given."""
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)


def expanded(rows: list[tuple[list[int], list[list[int]]]], mask_id: int, dtype: torch.dtype) -> dict:
    """One batch of (real token ids, anchors) rows laid out by chain_layout, right-padded: input_ids,
    position_ids, the 4D attention mask, and per slot its anchor and depth (-1 on padding: a mask token that
    sees only itself)."""
    layouts = [chain_layout(len(ids), anchors) for ids, anchors in rows]
    width = max(len(a) for a, _, _ in layouts)
    batch = len(rows)
    input_ids = torch.full((batch, width), mask_id, dtype=torch.long)
    anchor = torch.full((batch, width), -1, dtype=torch.long)
    depth = torch.full((batch, width), -1, dtype=torch.long)
    visible = torch.eye(width, dtype=torch.bool).repeat(batch, 1, 1)
    for i, ((ids, _), (a, d, v)) in enumerate(zip(rows, layouts)):
        n = len(a)
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        input_ids[i, len(ids) : n] = mask_id
        anchor[i, :n], depth[i, :n], visible[i, :n, :n] = a, d, v
    return {
        "input_ids": input_ids,
        "position_ids": (anchor + depth).clamp(min=0),
        "attention_mask": additive_mask(visible, dtype)[:, None],
        "anchor": anchor,
        "depth": depth,
    }


def slot_targets(layout: dict, tokens: torch.Tensor) -> torch.Tensor:
    """The token each slot predicts, tokens[anchor + depth + 1] (-100 past the end or on padding): (batch, width).
    `tokens` is (batch, n) with -100 where a row has no token to predict."""
    index = layout["anchor"] + layout["depth"] + 1
    inside = (layout["depth"] >= 0) & (index < tokens.shape[1])
    gathered = tokens.gather(1, index.clamp(0, tokens.shape[1] - 1))
    return torch.where(inside, gathered, torch.full_like(gathered, -100))


def hidden_states(model, rows: list[tuple[list[int], list[list[int]]]], mask_id: int, dtype: torch.dtype):
    """(layout on the model's device, the final hidden states of every slot): one forward pass of the base model
    over `rows` laid out by `expanded`."""
    layout = {key: value.to(model.device) for key, value in expanded(rows, mask_id, dtype).items()}
    hidden = model.base_model(
        input_ids=layout["input_ids"],
        attention_mask=layout["attention_mask"],
        position_ids=layout["position_ids"],
        use_cache=False,
    ).last_hidden_state
    return layout, hidden
