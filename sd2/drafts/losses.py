"""The fine-tuning objectives of the registry's losses (sd2.methods.LOSSES), one per loss:

- ce: cross-entropy on the response tokens (the paper's SD² fine-tuning);
- kl: forward KL(p_target || q_draft) over the whole vocabulary, per response position;
- tvdpp: TVD++ (Goel et al. 2024, arXiv 2403.00858), total-variation distance trained
  with a policy-gradient estimator whose reward is normalised by its batch statistics;
- squarehead: SquareHead distillation (Kurtic et al. 2023, arXiv 2310.06927), the response
  cross-entropy plus, per decoder layer, the MSE between the draft's and the teacher's
  hidden states normalised by the teacher's; here the teacher is the dense draft itself,
  teaching its own sparse copy;
- skd: Speculative Knowledge Distillation (Xu et al. 2024, arXiv 2410.11325): forward KL
  to the target on responses the draft generates on-policy (sd2.drafts.skd makes them);
- pard: parallel drafting (An et al. 2025, arXiv 2504.18583): the response cross-entropy of the
  draft's next-token predictions and of its mask tokens' predictions k - 1 tokens further, over
  nested mask chains dropped at random (sd2.parallel).

An objective is `objective(model, teacher, batch, chunk_tokens) -> scalar loss` (teacher None
for ce); the output layer runs in chunks of `chunk_tokens` labelled positions (sd2.chunked_loss).
Its `definition` (defined_as) is what the fine-tuned checkpoint's provenance records (an objective
without one: the registry's description). Logits are aligned
as in a causal LM's loss: position t predicts token t + 1.
"""

import torch

from sd2 import parallel
from sd2.chunked_loss import (
    check_plain_logits,
    chunk_sum,
    chunked_causal_lm_loss,
    chunked_cross_entropy,
    labelled_hidden,
    output_logits,
)


def defined_as(definition: str):
    """Attach the definition the provenance records to an objective."""

    def mark(objective):
        objective.definition = definition
        return objective

    return mark


# ---- pure functions on aligned logits ----


def kl_rows(draft_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(p || q) per position, p = softmax(teacher), q = softmax(draft)."""
    log_p = teacher_logits.float().log_softmax(-1)
    log_q = draft_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_loss(draft_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward KL(p || q), mean over positions where mask is true."""
    mask = mask.float()
    return (kl_rows(draft_logits, teacher_logits) * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def tvdpp_rewards(log_q: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor | None):
    """(tokens, reward sign(p(x) - q(x))) per position; tokens sampled from q when None."""
    if tokens is None:
        tokens = torch.distributions.Categorical(logits=log_q).sample()
    log_q_x = log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # Both sides through the same log_softmax, so equal logits give exactly r = 0.
    log_p_x = teacher_logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, torch.sign(log_p_x - log_q_x)


def normalised(reward: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """TVD++'s advantage: the reward standardised by its statistics over the batch's positions."""
    return (reward - reward.mean()) / (reward.std(unbiased=False) + eps)


def tvdpp_loss(
    draft_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """TVD++ surrogate loss: its gradient estimates (a positive multiple of) the gradient of TV(p, q).

    grad TV(p, q) = -1/2 E_{x~q}[sign(p(x) - q(x)) grad log q(x)], a policy gradient with
    reward r(x) = sign(p(x) - q(x)). TVD++ replaces r by (r - mean) / std over the batch's
    positions (variance reduction). `tokens` are the x of every position; by default one is
    sampled from q per position, which makes the estimator the policy gradient above.
    Identical p and q give r = 0 everywhere, hence a zero loss and gradient.
    """
    log_q = draft_logits.float().log_softmax(-1)
    tokens, reward = tvdpp_rewards(log_q.detach(), teacher_logits, tokens)
    log_q_x = log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask = mask.bool()
    advantage = torch.zeros_like(reward)
    advantage[mask] = normalised(reward[mask], eps)
    mask = mask.float()
    return -(advantage * log_q_x * mask).sum() / mask.sum().clamp(min=1)


def squarehead_layers(student_hidden, teacher_hidden, eps: float = torch.finfo(torch.float32).eps) -> torch.Tensor:
    """SquareHead's per-layer terms: MSE(h_s, h_t) / MSE(h_t, 0) for each layer's (positions, hidden) states.

    Normalising by the teacher's energy puts every layer on the same scale, whatever the
    magnitude its activations grow to (Kurtic et al. 2023, Sec. 3); eps as in their code.
    Raises unless both models give as many layers, of the same shapes.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"squarehead: the draft has {len(student_hidden)} hidden-state layers, the teacher "
            f"{len(teacher_hidden)}; the teacher must be the dense draft (same architecture)"
        )
    terms = []
    for i, (h_s, h_t) in enumerate(zip(student_hidden, teacher_hidden)):
        if h_s.shape != h_t.shape:
            raise ValueError(
                f"squarehead: layer {i} hidden states are {tuple(h_s.shape)} in the draft and {tuple(h_t.shape)} in "
                "the teacher; the teacher must be the dense draft (same architecture)"
            )
        h_t = h_t.float()
        terms.append((h_s.float() - h_t).pow(2).mean() / (h_t.pow(2).mean() + eps))
    return torch.stack(terms)


# ---- the same losses on a model pair, the output layers run in chunks of positions ----


def distillation_rows(model, teacher, batch):
    """(draft hidden, teacher hidden, shared vocabulary size) at the positions that predict a label."""
    hidden, _, keep = labelled_hidden(model, batch)
    check_plain_logits(teacher)
    with torch.no_grad():
        teacher_hidden = teacher.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state[:, :-1][keep]
    return hidden, teacher_hidden, shared_vocabulary(model, teacher)


def shared_vocabulary(model, teacher) -> int:
    """The output rows both models have: models of one family may pad their vocabularies to different
    sizes, and the extra ids are never produced by the tokenizer."""
    return min(model.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features)


def layer_states(model, batch, keep: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output at the positions `keep` marks (the last after the final norm, as HF gives it)."""
    out = model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
        output_hidden_states=True,
    )
    return [h[:, :-1][keep] for h in out.hidden_states[1:]]  # [0] is the embeddings' output


# ---- the objectives ----


@defined_as("cross-entropy of the data's responses")
def ce(model, teacher, batch, chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of the labelled response tokens (`teacher` unused)."""
    return chunked_causal_lm_loss(model, batch, chunk_tokens)


@defined_as("forward KL(target || draft) per response position, on the data's responses")
def kl(model, teacher, batch, chunk_tokens: int) -> torch.Tensor:
    """kl_loss of the draft against the teacher over the labelled positions, in chunks."""
    hidden, teacher_hidden, vocab = distillation_rows(model, teacher, batch)

    def chunk_kl(h, th):
        with torch.no_grad():
            teacher_logits = output_logits(teacher, th)[:, :vocab]
        return kl_rows(output_logits(model, h)[:, :vocab], teacher_logits).sum()

    return chunk_sum(chunk_kl, chunk_tokens, hidden, teacher_hidden) / max(1, hidden.shape[0])


@defined_as("TVD++ (Goel et al. 2024): policy-gradient TV distance to the target, batch-normalised reward")
def tvdpp(model, teacher, batch, chunk_tokens: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """tvdpp_loss over the labelled positions, in chunks (`tokens`: one per labelled position, else sampled).

    The reward's mean and std span all labelled positions of `batch` (of each micro-batch
    when training accumulates micro-batches), so a first pass
    without gradients computes every chunk's rewards before the loss's pass.
    """
    hidden, teacher_hidden, vocab = distillation_rows(model, teacher, batch)
    sampled, rewards = [], []
    with torch.no_grad():
        for i in range(0, hidden.shape[0], chunk_tokens):
            log_q = output_logits(model, hidden[i : i + chunk_tokens])[:, :vocab].float().log_softmax(-1)
            given = None if tokens is None else tokens[i : i + chunk_tokens]
            x, r = tvdpp_rewards(log_q, output_logits(teacher, teacher_hidden[i : i + chunk_tokens])[:, :vocab], given)
            sampled.append(x)
            rewards.append(r)
    advantage = normalised(torch.cat(rewards))

    def surrogate(h, x, a):
        log_q_x = output_logits(model, h)[:, :vocab].float().log_softmax(-1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
        return -(a * log_q_x).sum()

    return chunk_sum(surrogate, chunk_tokens, hidden, torch.cat(sampled), advantage) / max(1, hidden.shape[0])


@defined_as(
    "response cross-entropy + SquareHead (Kurtic et al. 2023): sum over decoder layers of "
    "MSE(draft hidden, dense-draft hidden) / MSE(dense-draft hidden, 0) on the response positions, weights 1 and 1"
)
def squarehead(model, teacher, batch, chunk_tokens: int) -> torch.Tensor:
    """SquareHead's loss: response cross-entropy + the sum over layers of squarehead_layers.

    Both terms weigh 1, as in the authors' recipes (IST-DASLab/SparseFinetuning:
    hardness_ce 1, hardness_squarehead 1, hardness_kldiv 0), and the layer terms are
    summed, not averaged, as there. The cross-entropy stays in: the responses are the
    target's, which the dense draft only approximates, so the hidden-state term pulls
    the sparse draft back to what it computed before pruning while the cross-entropy
    keeps it moving toward the target. The positions are those that predict a response
    token (the authors use every non-padding position; the prompt is not trained on here).
    """
    check_plain_logits(model)
    keep = batch["labels"][:, 1:] != -100
    states = layer_states(model, batch, keep)
    with torch.no_grad():
        teacher_states = layer_states(teacher, batch, keep)
    labels = batch["labels"][:, 1:][keep]
    ce_term = chunked_cross_entropy(model, states[-1], labels, chunk_tokens)
    return ce_term + squarehead_layers(states, teacher_states).sum()


@defined_as(
    "SKD (Xu et al. 2024): forward KL(target || draft) per response position, on responses the draft "
    "generates for the data's prompts before each step, every draft token outside the target's top-K "
    "replaced by the target's own token"
)
def skd(model, teacher, batch, chunk_tokens: int) -> torch.Tensor:
    """kl on the batch: what makes it SKD is its batches, the draft's own answers (the loss is on_policy)."""
    return kl(model, teacher, batch, chunk_tokens)


def pard_rows(batch, settings: dict) -> list[tuple[list[int], list[list[int]]]]:
    """Per row of a right-padded batch: its tokens and the anchors of its mask chains, every position whose
    depth-1 mask has a response token to predict, dropped by depth (settings: the config's `parallel`)."""
    rows = []
    for ids, keep, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(keep.sum())
        labelled = (labels[:n] != -100).tolist()
        candidates = [a for a in range(n - 2) if labelled[a + 2]]
        anchors = parallel.nested_anchors(
            candidates, settings["k"] - 1, settings["keep"], settings["keep_min"], generator=None
        )
        rows.append((ids[:n].tolist(), anchors))
    return rows


def compute_dtype(model) -> torch.dtype:
    """The dtype attention computes in: autocast's where it is on, else the weights'. An additive mask in
    another dtype than the queries' is refused by some attention kernels."""
    kind = model.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else next(model.parameters()).dtype


@defined_as(
    "mean cross-entropy over every labelled slot of the batch laid out with nested mask chains (sd2.parallel): "
    "a real token predicts the next, the j-th mask after x_a predicts x_(a+1+j); chains kept at depth j: a fraction "
    "max(keep**j, keep_min) of the anchors (PARD's conditional drop-token)"
)
def pard(model, teacher, batch, chunk_tokens: int, *, settings: dict) -> torch.Tensor:
    """settings: the config's `parallel` (finetune binds it); the mask token is the draft config's."""
    check_plain_logits(model)
    mask_id = parallel.mask_token(model)
    layout, hidden = parallel.hidden_states(model, pard_rows(batch, settings), mask_id, compute_dtype(model))
    targets = parallel.slot_targets(layout, batch["labels"])
    keep = targets != -100
    return chunked_cross_entropy(model, hidden[keep], targets[keep], chunk_tokens)
