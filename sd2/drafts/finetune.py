"""Rule finetune: fine-tune a (possibly pruned) draft on prompt/response data, masks held fixed.

Losses (settings["loss"]):
- ce: cross-entropy on the response tokens (the paper's SD² fine-tuning);
- kl: forward KL(p_target || q_draft) over the whole vocabulary, per response position;
- tvdpp: TVD++ (Goel et al. 2024, arXiv 2403.00858), total-variation distance trained
  with a policy-gradient estimator whose reward is normalised by its batch statistics;
- squarehead: SquareHead distillation (Kurtic et al. 2023, arXiv 2310.06927), the response
  cross-entropy plus, per decoder layer, the MSE between the draft's and the teacher's
  hidden states normalised by the teacher's; here the teacher is the dense draft itself,
  teaching its own sparse copy (teacher_dir: the dense draft, same architecture);
- skd: Speculative Knowledge Distillation (Xu et al. 2024, arXiv 2410.11325), on-policy:
  before each step the draft answers the batch's prompts, the target replacing every
  draft token outside its top-K, and the draft is trained with forward KL to the target
  on those interleaved responses (teacher_dir: the target).
The SD² paper names the last two as future work. kl, tvdpp and skd need the target's
logits and squarehead the dense draft's hidden states, so draft and teacher must share a
tokenizer. Every loss sees the same prompts (the fine-tuning data) for the same number of
optimizer steps, so a loss sweep compares them at matched data and steps.

Validation loss is always the held-out cross-entropy of the responses, whatever the
training loss, so curves of different losses can be compared.

settings["quantization_aware"] (a scheme of sd2.drafts.quantize, e.g. "w4a16"; set by the workflow
for a `<variant>@<scheme>-qat` draft, absent otherwise): quantization-aware fine-tuning, the same
run with the decoder linears' forward fake-quantised to that scheme (straight-through gradient,
masks held); rule quantize then quantizes the result with the scheme, as it does the plain draft.
"""

import contextlib
import math

import torch
from datasets import load_from_disk
from transformers import AutoConfig

from sd2 import chat, training
from sd2.checkpoint import save_checkpoint
from sd2.chunked_loss import (
    check_plain_logits,
    chunk_sum,
    chunked_causal_lm_loss,
    chunked_cross_entropy,
    default_chunk_tokens,
    labelled_hidden,
    output_logits,
)
from sd2.drafts.quantize import fake_quantized
from sd2.engines import eos_ids
from sd2.models import decoder_linears, default_device, load_model, load_tokenizer, same_tokenizer
from sd2.provenance import provenance

LOSSES = ("ce", "kl", "tvdpp", "squarehead", "skd")
# The model each loss learns from (teacher_dir); ce needs none.
TEACHERS = {"kl": "target", "tvdpp": "target", "skd": "target", "squarehead": "dense draft"}
LOSS_DEFINITIONS = {
    "ce": "cross-entropy of the data's responses",
    "kl": "forward KL(target || draft) per response position, on the data's responses",
    "tvdpp": "TVD++ (Goel et al. 2024): policy-gradient TV distance to the target, batch-normalised reward",
    "squarehead": "response cross-entropy + SquareHead (Kurtic et al. 2023): sum over decoder layers of "
    "MSE(draft hidden, dense-draft hidden) / MSE(dense-draft hidden, 0) on the response positions, weights 1 and 1",
    "skd": "SKD (Xu et al. 2024): forward KL(target || draft) per response position, on responses the draft "
    "generates for the data's prompts before each step, every draft token outside the target's top-K "
    "replaced by the target's own token",
}


# ---- losses: pure functions on aligned logits (position t predicts token t + 1) ----


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


# ---- the same losses on a model pair, the output layers run in chunks of positions ----


def _distillation_rows(model, teacher, batch):
    """(draft hidden, teacher hidden, shared vocabulary size) at the positions that predict a label."""
    hidden, _, keep = labelled_hidden(model, batch)
    check_plain_logits(teacher)
    with torch.no_grad():
        teacher_hidden = teacher.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state[:, :-1][keep]
    # Models of one family may pad their vocabularies to different sizes; the extra
    # ids are never produced by the tokenizer.
    vocab = min(model.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features)
    return hidden, teacher_hidden, vocab


def chunked_kl(model, teacher, batch, chunk_tokens: int) -> torch.Tensor:
    """kl_loss of the draft against the teacher over the labelled positions, in chunks."""
    hidden, teacher_hidden, vocab = _distillation_rows(model, teacher, batch)

    def kl(h, th):
        with torch.no_grad():
            teacher_logits = output_logits(teacher, th)[:, :vocab]
        return kl_rows(output_logits(model, h)[:, :vocab], teacher_logits).sum()

    return chunk_sum(kl, chunk_tokens, hidden, teacher_hidden) / max(1, hidden.shape[0])


def chunked_tvdpp(model, teacher, batch, chunk_tokens: int, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """tvdpp_loss over the labelled positions, in chunks (`tokens`: one per labelled position, else sampled).

    The reward's mean and std span all labelled positions of `batch` (of each micro-batch
    when training accumulates micro-batches), so a first pass
    without gradients computes every chunk's rewards before the loss's pass.
    """
    hidden, teacher_hidden, vocab = _distillation_rows(model, teacher, batch)
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


def layer_states(model, batch, keep: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output at the positions `keep` marks (the last after the final norm, as HF gives it)."""
    out = model.base_model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        use_cache=False,
        output_hidden_states=True,
    )
    return [h[:, :-1][keep] for h in out.hidden_states[1:]]  # [0] is the embeddings' output


def chunked_squarehead(model, teacher, batch, chunk_tokens: int) -> torch.Tensor:
    """SquareHead's loss: response cross-entropy + the sum over layers of squarehead_layers.

    Both terms weigh 1, as in the authors' recipes (IST-DASLab/SparseFinetuning:
    hardness_ce 1, hardness_squarehead 1, hardness_kldiv 0), and the layer terms are
    summed, not averaged, as there. Kept from the task loss: the responses are the
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
    ce = chunked_cross_entropy(model, states[-1], labels, chunk_tokens)
    return ce + squarehead_layers(states, teacher_states).sum()


def check_same_architecture(model, teacher, teacher_dir) -> None:
    """Raise unless `teacher` has the draft's layer count and hidden size (squarehead's dense draft)."""
    for key in ("num_hidden_layers", "hidden_size"):
        mine, theirs = getattr(model.config, key), getattr(teacher.config, key)
        if mine != theirs:
            raise ValueError(
                f"loss 'squarehead' compares the hidden states of every layer, so the teacher must be the dense "
                f"draft itself: {key} is {mine} in the draft and {theirs} in the teacher {teacher_dir}"
            )


# ---- SKD's interleaved responses, generated before each step ----


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
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Models of one family may pad their vocabularies to different sizes (see _distillation_rows).
    vocab = min(student.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features)
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


def finetune_loss_fn(kind: str, teacher, chunk_tokens: int):
    """A training.train loss_fn: ce, or a loss against `teacher` (module docstring), when training; CE when evaluating.

    skd's loss is kl: what makes it SKD is its batches (skd_batches).
    """

    def loss_fn(model, batch):
        if kind == "ce" or not model.training:
            return chunked_causal_lm_loss(model, batch, chunk_tokens)
        if kind in ("kl", "skd"):
            return chunked_kl(model, teacher, batch, chunk_tokens)
        if kind == "squarehead":
            return chunked_squarehead(model, teacher, batch, chunk_tokens)
        return chunked_tvdpp(model, teacher, batch, chunk_tokens)

    return loss_fn


# ---- fixed sparsity masks ----


def sparsity_masks(model) -> dict[str, torch.Tensor]:
    """mask = (weight != 0) for every decoder linear that has zeros; dense layers get none."""
    return {n: m.weight.detach() != 0 for n, m in decoder_linears(model).items() if bool((m.weight == 0).any())}


def hold_masks(model, masks: dict[str, torch.Tensor]):
    """Keep pruned weights at zero; returns the after_step hook for training.train.

    Masking the gradient keeps AdamW's moments of pruned weights at zero and leaves them
    out of the clipping norm; re-applying the mask after each step guarantees exact zeros.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.register_hook(lambda grad, mask=mask: grad * mask)

    @torch.no_grad()
    def apply(model_):
        for name, mask in masks.items():
            modules[name].weight.mul_(mask)

    apply(model)
    return apply


def zero_counts(model) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in decoder_linears(model).items()}


def check_masks(model, masks: dict, before: dict[str, int], when: str = "during fine-tuning") -> None:
    """Raise unless every pruned weight is zero and every layer has as many zeros as `before`."""
    after = zero_counts(model)
    for name, module in decoder_linears(model).items():
        if name in masks and bool((module.weight[~masks[name]] != 0).any()):
            raise RuntimeError(f"layer {name}: a pruned weight became non-zero {when}")
        if after[name] != before[name]:
            raise RuntimeError(f"layer {name}: {before[name]} zeros before fine-tuning, {after[name]} {when}")


def stored_dtype(checkpoint_dir) -> torch.dtype:
    """The dtype a checkpoint's config.json declares for its weights (float32 when it declares none)."""
    dtype = AutoConfig.from_pretrained(str(checkpoint_dir)).dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32


# ---- the rule ----


def finetune(init_dir, data_dir, out_dir, *, settings: dict, seed: int, teacher_dir=None, run=None) -> list[dict]:
    """Fine-tune `init_dir` on `data_dir` (prompt, response) with its pruning masks fixed; save to out_dir."""
    kind = settings["loss"]
    if kind not in LOSSES:
        raise ValueError(f"unknown fine-tuning loss {kind!r} (known: {', '.join(LOSSES)})")
    torch.manual_seed(seed)
    device = default_device()
    tokenizer = load_tokenizer(init_dir)
    # Master weights in fp32 whatever the checkpoint stores (bf16 for hub drafts): AdamW's
    # small updates would round away in bf16. The result is saved back in the stored dtype.
    saved_dtype = stored_dtype(init_dir)
    model = load_model(init_dir, device=device, dtype=torch.float32)
    bs = settings["batch_size"]
    micro = settings["micro_batch_size"] or bs
    if micro > bs:
        raise ValueError(f"finetune.micro_batch_size ({micro}) is larger than finetune.batch_size ({bs})")
    chunk = settings["loss_chunk_tokens"] or default_chunk_tokens(model.get_output_embeddings().out_features)
    if settings["gradient_checkpointing"]:
        # Non-reentrant: the recommended implementation, and it works with inputs that need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    teacher = None
    if kind != "ce":
        role = TEACHERS[kind]
        if teacher_dir is None:
            raise ValueError(f"loss '{kind}' learns from the {role}: pass teacher_dir")
        if not same_tokenizer(tokenizer, load_tokenizer(teacher_dir)):
            raise ValueError(
                f"loss '{kind}' compares the two models position by position, so the draft ({init_dir}) and the "
                f"{role} ({teacher_dir}) must share a tokenizer; they do not. Use loss 'ce' across tokenizer families."
            )
        teacher = load_model(teacher_dir, device=device)
        if kind == "squarehead":
            check_same_architecture(model, teacher, teacher_dir)

    data = load_from_disk(str(data_dir))
    # Self-distilled data in the target's format, original data in the draft's own (sd2.chat).
    examples, data_format = chat.encode_dataset(tokenizer, data, data_dir, settings.get("chat"), settings["seq_len"])
    train_idx, val_idx = training.split(len(examples), settings["validation_fraction"], seed)
    train_set, val_set = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    pad = tokenizer.pad_token_id
    steps = max(1, math.ceil(settings["epochs"] * len(train_set) / bs))
    if settings.get("max_steps"):
        steps = min(steps, settings["max_steps"])
    val_batches = [
        {k: v.to(device) for k, v in training.collate(val_set[i : i + bs], pad).items()}
        for i in range(0, len(val_set), bs)
    ]

    masks = sparsity_masks(model)
    zeros_before = zero_counts(model)
    sparsity_before = {n: zeros_before[n] / m.weight.numel() for n, m in decoder_linears(model).items()}
    print(
        f"finetune: loss {kind}, {steps} steps of {bs}, {len(train_set)} train / {len(val_set)} validation examples, "
        f"{len(masks)} masked layers; micro-batches of {micro} ({math.ceil(bs / micro)} per step), "
        f"loss chunks of {chunk} positions, gradient checkpointing {settings['gradient_checkpointing']}, "
        f"quantization-aware: {settings.get('quantization_aware') or 'no'}"
    )
    batches = training.shuffled_batches(train_set, bs, pad, seed, device)
    skd_counts = {"generated_tokens": 0, "replaced_tokens": 0}
    if kind == "skd":
        # The same data batches as every other loss: their prompts, answered on-policy.
        batches = skd_batches(
            model, teacher, batches, settings=settings, stop_ids=eos_ids(init_dir), pad_id=pad, counts=skd_counts
        )
    # Quantization-aware fine-tuning: every forward of the draft (training, validation, skd's
    # on-policy answers) sees its decoder linears fake-quantised to the scheme rule quantize will
    # apply, the gradient straight through to the fp32 weights, masks held as ever.
    aware = settings.get("quantization_aware")
    with fake_quantized(model, aware) if aware else contextlib.nullcontext():
        history = training.train(
            model,
            batches,
            val_batches,
            steps=steps,
            lr=settings["lr"],
            warmup_steps=min(settings["warmup_steps"], steps - 1),
            weight_decay=settings["weight_decay"],
            eval_every=settings["eval_every"],
            run=run,
            loss_fn=finetune_loss_fn(kind, teacher, chunk),
            after_step=hold_masks(model, masks),
            desc=f"finetune {kind}" + (f" ({aware}-aware)" if aware else ""),
            bf16=settings["bf16"],
            micro_batch_size=micro,
        )
    check_masks(model, masks, zeros_before)
    if settings["gradient_checkpointing"]:
        model.gradient_checkpointing_disable()  # a training setting, not part of the saved model
    model.to(saved_dtype)
    check_masks(model, masks, zeros_before, when=f"when cast to {saved_dtype} for saving")
    sparsity_after = {n: z / decoder_linears(model)[n].weight.numel() for n, z in zero_counts(model).items()}

    info = provenance(
        seed=seed,
        init=str(init_dir),
        data=str(data_dir),
        teacher=None if teacher_dir is None else str(teacher_dir),
        finetune=settings,
    )
    loss = {"name": kind, "definition": LOSS_DEFINITIONS[kind], "teacher": TEACHERS.get(kind)}
    quantization_aware = None
    if aware:
        quantization_aware = {
            "scheme": aware,
            "forward": "decoder linears fake-quantised (sd2.drafts.quantize.fake_quantize), straight-through "
            "gradient to the fp32 weights; validation loss and training curves are the fake-quantised model's",
        }
    if kind == "skd":
        generated = skd_counts["generated_tokens"]
        loss.update(
            top_k=settings["skd_top_k"],
            decoding=settings["skd_decoding"],
            max_new_tokens=settings["skd_max_new_tokens"],
            generated_tokens=generated,
            replaced_fraction=skd_counts["replaced_tokens"] / generated if generated else None,
        )
    info.update(
        loss=loss,
        quantization_aware=quantization_aware,
        steps=steps,
        train_examples=len(train_set),
        validation_examples=len(val_set),
        validation_loss="cross-entropy of the held-out responses (whatever the training loss)",
        data_format=data_format,
        sparsity_before=sparsity_before,
        sparsity_after=sparsity_after,
        final=history[-1],
        precision=history[-1]["precision"],
        memory={
            "micro_batch_size": micro,
            "accumulation_steps": math.ceil(bs / micro),
            "gradient_checkpointing": settings["gradient_checkpointing"],
            "loss_chunk_tokens": chunk,
            "loss": "output layer + loss in chunks of loss_chunk_tokens labelled positions (sd2.chunked_loss)",
            "master_weights": "float32",
            "saved_dtype": str(saved_dtype).removeprefix("torch."),
        },
        tokens_per_s=training.throughput(history),
        threads=torch.get_num_threads(),
    )
    save_checkpoint(
        model, tokenizer, out_dir, info, extra_files={"training.csv": lambda p: training.write_csv(p, history)}
    )
    return history
