"""Rule finetune: fine-tune a (possibly pruned) draft on prompt/response data, masks held fixed.

Losses (settings["loss"]):
- ce: cross-entropy on the response tokens (the paper's SD² fine-tuning);
- kl: forward KL(p_target || q_draft) over the whole vocabulary, per response position;
- tvdpp: TVD++ (Goel et al. 2024, arXiv 2403.00858), total-variation distance trained
  with a policy-gradient estimator whose reward is normalised by its batch statistics.
kl and tvdpp need the target's logits, so the draft and target must share a tokenizer.

Validation loss is always the held-out cross-entropy of the responses, whatever the
training loss, so curves of different losses can be compared.
"""

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
    default_chunk_tokens,
    labelled_hidden,
    output_logits,
)
from sd2.models import decoder_linears, default_device, load_model, load_tokenizer, same_tokenizer
from sd2.provenance import provenance

LOSSES = ("ce", "kl", "tvdpp")


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


def finetune_loss_fn(kind: str, teacher, chunk_tokens: int):
    """A training.train loss_fn: ce, or kl / tvdpp against `teacher`, when training; CE when evaluating."""

    def loss_fn(model, batch):
        if kind == "ce" or not model.training:
            return chunked_causal_lm_loss(model, batch, chunk_tokens)
        if kind == "kl":
            return chunked_kl(model, teacher, batch, chunk_tokens)
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
        if teacher_dir is None:
            raise ValueError(f"loss '{kind}' needs the target's logits: pass teacher_dir")
        if not same_tokenizer(tokenizer, load_tokenizer(teacher_dir)):
            raise ValueError(
                f"loss '{kind}' compares token distributions, so the draft ({init_dir}) and the target "
                f"({teacher_dir}) must share a tokenizer; they do not. Use loss 'ce' across tokenizer families."
            )
        teacher = load_model(teacher_dir, device=device)

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
        f"loss chunks of {chunk} positions, gradient checkpointing {settings['gradient_checkpointing']}"
    )
    history = training.train(
        model,
        training.shuffled_batches(train_set, bs, pad, seed, device),
        val_batches,
        steps=steps,
        lr=settings["lr"],
        warmup_steps=min(settings["warmup_steps"], steps - 1),
        weight_decay=settings["weight_decay"],
        eval_every=settings["eval_every"],
        run=run,
        loss_fn=finetune_loss_fn(kind, teacher, chunk),
        after_step=hold_masks(model, masks),
        desc=f"finetune {kind}",
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
    info.update(
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
