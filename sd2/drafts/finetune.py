"""Rule finetune: fine-tune a (possibly pruned) draft on prompt/response data, masks held fixed.

settings["loss"] names a loss of the registry (sd2.methods.LOSSES); its objective
(sd2.drafts.losses) is the training loss. A loss with a teacher (teacher_dir) learns from the
target's logits or, for squarehead, from the dense draft's hidden states, so draft and teacher
must share a tokenizer. Every loss sees the same prompts (the fine-tuning data) for the same
number of optimizer steps, so a loss sweep compares them at matched data and steps; an
on-policy loss (skd) trains on the draft's own answers to those prompts (sd2.drafts.skd).

Validation loss is always the held-out cross-entropy of the responses, whatever the
training loss, so curves of different losses can be compared.

settings["quantization_aware"] (a scheme of sd2.drafts.quantize, e.g. "w4a16"; set by the workflow
for a `<variant>@<scheme>-qat` draft, absent otherwise): quantization-aware fine-tuning, the same
run with the decoder linears' forward fake-quantised to that scheme (straight-through gradient,
masks held); rule quantize then quantizes the result with the scheme, as it does the plain draft.
"""

import contextlib
import functools
import math

import torch
from datasets import load_from_disk
from transformers import AutoConfig

from sd2 import chat, methods, parallel, training
from sd2.checkpoint import save_checkpoint
from sd2.chunked_loss import chunked_causal_lm_loss, default_chunk_tokens
from sd2.drafts.quantize import fake_quantized
from sd2.drafts.skd import skd_batches, skd_record
from sd2.generation import eos_ids
from sd2.masks import check_masks, hold_masks, sparsity_masks, zero_counts
from sd2.models import decoder_linears, default_device, layer_sparsity, load_model, load_tokenizer, same_tokenizer
from sd2.provenance import provenance

# How the provenance and the errors name a loss's teacher (sd2.methods.Loss.teacher).
TEACHER_ROLES = {"target": "target", "draft": "dense draft"}


def finetune_loss_fn(objective, teacher, chunk_tokens: int):
    """A training.train loss_fn: `objective` (sd2.drafts.losses) when training, the response cross-entropy
    when evaluating."""

    def loss_fn(model, batch):
        if not model.training:
            return chunked_causal_lm_loss(model, batch, chunk_tokens)
        return objective(model, teacher, batch, chunk_tokens)

    return loss_fn


def check_same_architecture(loss: str, model, teacher, teacher_dir) -> None:
    """Raise unless `teacher` has the draft's layer count and hidden size (the dense draft itself)."""
    for key in ("num_hidden_layers", "hidden_size"):
        mine, theirs = getattr(model.config, key), getattr(teacher.config, key)
        if mine != theirs:
            raise ValueError(
                f"loss '{loss}' compares the hidden states of every layer, so the teacher must be the dense "
                f"draft itself: {key} is {mine} in the draft and {theirs} in the teacher {teacher_dir}"
            )


def load_teacher(loss: methods.Loss, model, tokenizer, init_dir, teacher_dir, device):
    """The model `loss` learns from (None for a loss without a teacher), checked against the draft."""
    if loss.teacher is None:
        return None
    role = TEACHER_ROLES[loss.teacher]
    if teacher_dir is None:
        raise ValueError(f"loss '{loss.name}' learns from the {role}: pass teacher_dir")
    if not same_tokenizer(tokenizer, load_tokenizer(teacher_dir)):
        raise ValueError(
            f"loss '{loss.name}' compares the two models position by position, so the draft ({init_dir}) and the "
            f"{role} ({teacher_dir}) must share a tokenizer; they do not. Use loss 'ce' across tokenizer families."
        )
    teacher = load_model(teacher_dir, device=device)
    if loss.teacher == "draft":
        check_same_architecture(loss.name, model, teacher, teacher_dir)
    return teacher


def stored_dtype(checkpoint_dir) -> torch.dtype:
    """The dtype a checkpoint's config.json declares for its weights (float32 when it declares none)."""
    dtype = AutoConfig.from_pretrained(str(checkpoint_dir)).dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32


def batching(model, settings: dict) -> tuple[int, int, int]:
    """(sequences per step, per forward/backward pass, labelled positions per loss chunk)."""
    bs = settings["batch_size"]
    micro = settings["micro_batch_size"] or bs
    if micro > bs:
        raise ValueError(f"finetune.micro_batch_size ({micro}) is larger than finetune.batch_size ({bs})")
    chunk = settings["loss_chunk_tokens"] or default_chunk_tokens(model.get_output_embeddings().out_features)
    return bs, micro, chunk


def fine_tuning_data(tokenizer, data_dir, settings: dict, seed: int, device):
    """(train examples, validation examples, validation batches, data format) of `data_dir`."""
    data = load_from_disk(str(data_dir))
    # Self-distilled data in the target's format, original data in the draft's own (sd2.chat).
    examples, data_format = chat.encode_dataset(tokenizer, data, data_dir, settings.get("chat"), settings["seq_len"])
    train_idx, val_idx = training.split(len(examples), settings["validation_fraction"], seed)
    train_set, val_set = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    bs, pad = settings["batch_size"], tokenizer.pad_token_id
    val_batches = [
        {k: v.to(device) for k, v in training.collate(val_set[i : i + bs], pad).items()}
        for i in range(0, len(val_set), bs)
    ]
    return train_set, val_set, val_batches, data_format


def step_count(settings: dict, train_examples: int) -> int:
    steps = max(1, math.ceil(settings["epochs"] * train_examples / settings["batch_size"]))
    if settings["max_steps"]:
        steps = min(steps, settings["max_steps"])
    return steps


def train_held(model, batches, val_batches, masks, loss_fn, *, steps: int, micro: int, settings: dict, desc: str, run):
    """training.train with the masks held; under quantization-aware fine-tuning every forward of the draft
    (training, validation, on-policy answers) sees its decoder linears fake-quantised to the scheme rule
    quantize will apply, the gradient straight through to the fp32 weights."""
    aware = settings.get("quantization_aware")
    with fake_quantized(model, aware) if aware else contextlib.nullcontext():
        return training.train(
            model,
            batches,
            val_batches,
            steps=steps,
            lr=settings["lr"],
            warmup_steps=min(settings["warmup_steps"], steps - 1),
            weight_decay=settings["weight_decay"],
            eval_every=settings["eval_every"],
            run=run,
            loss_fn=loss_fn,
            after_step=hold_masks(model, masks),
            desc=desc + (f" ({aware}-aware)" if aware else ""),
            bf16=settings["bf16"],
            micro_batch_size=micro,
        )


def loss_record(loss: methods.Loss, objective, settings: dict, on_policy_counts: dict) -> dict:
    """The provenance's `loss`: its name, definition and teacher, and an on-policy loss's generation."""
    definition = getattr(objective, "definition", loss.description)
    record = {"name": loss.name, "definition": definition, "teacher": TEACHER_ROLES.get(loss.teacher)}
    if loss.on_policy:
        record.update(skd_record(settings, on_policy_counts))
    return record


def quantization_aware_record(scheme: str | None) -> dict | None:
    if not scheme:
        return None
    return {
        "scheme": scheme,
        "forward": "decoder linears fake-quantised (sd2.drafts.quantize.fake_quantize), straight-through "
        "gradient to the fp32 weights; validation loss and training curves are the fake-quantised model's",
    }


def memory_record(settings: dict, micro: int, chunk: int, saved_dtype: torch.dtype) -> dict:
    return {
        "micro_batch_size": micro,
        "accumulation_steps": math.ceil(settings["batch_size"] / micro),
        "gradient_checkpointing": settings["gradient_checkpointing"],
        "loss_chunk_tokens": chunk,
        "loss": "output layer + loss in chunks of loss_chunk_tokens labelled positions (sd2.chunked_loss)",
        "master_weights": "float32",
        "saved_dtype": str(saved_dtype).removeprefix("torch."),
    }


def describe(loss: str, steps, n_train, n_validation, n_masked, bs, micro, chunk, settings: dict) -> str:
    """The line a run prints before it trains."""
    return (
        f"finetune: loss {loss}, {steps} steps of {bs}, {n_train} train / {n_validation} validation examples, "
        f"{n_masked} masked layers; micro-batches of {micro} ({math.ceil(bs / micro)} per step), "
        f"loss chunks of {chunk} positions, gradient checkpointing {settings['gradient_checkpointing']}, "
        f"quantization-aware: {settings.get('quantization_aware') or 'no'}"
    )


def cast_for_saving(model, dtype: torch.dtype, linears: dict, masks: dict, zeros_before: dict, settings: dict) -> None:
    """Drop the training settings and cast the trained draft to `dtype`; raises where a zero was lost before or in
    the cast."""
    check_masks(linears, masks, zeros_before)
    if settings["gradient_checkpointing"]:
        model.gradient_checkpointing_disable()  # a training setting, not part of the saved model
    model.to(dtype)
    check_masks(linears, masks, zeros_before, when=f"when cast to {dtype} for saving")


def finetune(init_dir, data_dir, out_dir, *, settings: dict, seed: int, teacher_dir=None, run=None) -> list[dict]:
    """Fine-tune `init_dir` on `data_dir` (prompt, response) with its pruning masks fixed; save to out_dir."""
    loss = methods.loss(settings["loss"])
    objective = methods.resolve(loss.objective)
    torch.manual_seed(seed)
    device = default_device()
    tokenizer = load_tokenizer(init_dir)
    # Master weights in fp32 whatever the checkpoint stores (bf16 for hub drafts): AdamW's
    # small updates would round away in bf16. The result is saved back in the stored dtype.
    saved_dtype = stored_dtype(init_dir)
    model = load_model(init_dir, device=device, dtype=torch.float32)
    bs, micro, chunk = batching(model, settings)
    if settings["gradient_checkpointing"]:
        # Non-reentrant: the recommended implementation, and it works with inputs that need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = load_teacher(loss, model, tokenizer, init_dir, teacher_dir, device)
    train_set, val_set, val_batches, data_format = fine_tuning_data(tokenizer, data_dir, settings, seed, device)
    steps = step_count(settings, len(train_set))
    linears = decoder_linears(model)
    masks, zeros_before, sparsity_before = sparsity_masks(linears), zero_counts(linears), layer_sparsity(model)
    print(describe(loss.name, steps, len(train_set), len(val_set), len(masks), bs, micro, chunk, settings))
    pad = tokenizer.pad_token_id
    batches = training.shuffled_batches(train_set, bs, pad, seed, device)
    on_policy_counts = {"generated_tokens": 0, "replaced_tokens": 0}
    if loss.on_policy:
        # The same data batches as every other loss: their prompts, answered on-policy.
        batches = skd_batches(
            model, teacher, batches, settings=settings, stop_ids=eos_ids(init_dir), pad_id=pad, counts=on_policy_counts
        )
    trained_objective = objective
    if loss.parallel:
        # Saved with the checkpoint: the measurement and vLLM's parallel drafting read it there.
        model.config.pard_token = parallel.choose_mask_token(tokenizer, settings["parallel"]["mask_token"])
        trained_objective = functools.partial(objective, settings=settings["parallel"])
    loss_fn = finetune_loss_fn(trained_objective, teacher, chunk)
    desc = f"finetune {loss.name}"
    history = train_held(
        model, batches, val_batches, masks, loss_fn, steps=steps, micro=micro, settings=settings, desc=desc, run=run
    )
    cast_for_saving(model, saved_dtype, linears, masks, zeros_before, settings)
    teacher_path = None if teacher_dir is None else str(teacher_dir)
    info = provenance(seed=seed, init=str(init_dir), data=str(data_dir), teacher=teacher_path, finetune=settings)
    info.update(
        loss=loss_record(loss, objective, settings, on_policy_counts),
        quantization_aware=quantization_aware_record(settings.get("quantization_aware")),
        steps=steps,
        train_examples=len(train_set),
        validation_examples=len(val_set),
        validation_loss="cross-entropy of the held-out responses (whatever the training loss)",
        data_format=data_format,
        sparsity_before=sparsity_before,
        sparsity_after=layer_sparsity(model),
        final=history[-1],
        precision=history[-1]["precision"],
        memory=memory_record(settings, micro, chunk, saved_dtype),
        tokens_per_s=training.throughput(history),
        threads=torch.get_num_threads(),
    )
    save_checkpoint(
        model, tokenizer, out_dir, info, extra_files={"training.csv": lambda p: training.write_csv(p, history)}
    )
    return history
