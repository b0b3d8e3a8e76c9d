"""One training loop for pretraining and fine-tuning: AdamW, warm-up + cosine, validation, CSV log."""

import csv
import functools
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sd2.precision import precision_name, resolve_bf16


def causal_lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy; label -100 marks positions that are not trained on."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]).loss


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def label_tokens(batch) -> int:
    """Positions a causal LM loss averages over: labels other than -100 after the shift (t predicts t + 1)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def micro_batches(batch: dict, size: int | None) -> list[dict]:
    """`batch` cut into runs of `size` sequences (None: the whole batch).

    A micro-batch drops the columns after its last real token: a batch is padded to its
    longest sequence, which one micro-batch need not hold, and with right padding the
    dropped positions are neither attended to nor trained on.
    """
    n = batch["input_ids"].shape[0]
    size = size or n
    parts = []
    for start in range(0, n, size):
        micro = {k: v[start : start + size] for k, v in batch.items()}
        if "attention_mask" in micro:
            width = int(micro["attention_mask"].any(0).nonzero().max()) + 1
            micro = {k: v[:, :width] for k, v in micro.items()}
        parts.append(micro)
    return parts


def accumulate_gradients(model, batch, loss_fn, micro_batch_size: int | None, bf16: bool = False):
    """Forward and backward `batch` in micro-batches; returns the batch's loss (a detached tensor).

    `loss_fn(model, micro)` is a mean over the micro-batch's label tokens. Each is weighted
    by its share of the whole batch's label tokens, so the accumulated gradient is that of
    the batch's token mean (what one pass over the whole batch gives), not the mean of
    micro-batch means, which would over-weight micro-batches with short responses.
    """
    total = label_tokens(batch)
    device_type = batch["input_ids"].device.type
    loss_sum = torch.zeros((), device=batch["input_ids"].device)
    for micro in micro_batches(batch, micro_batch_size):
        n = label_tokens(micro)
        if n == 0:  # nothing to learn from, and its mean loss would be 0 / 0
            continue
        # Weights and optimizer state stay fp32 under autocast.
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, micro) * (n / total)
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum


@torch.no_grad()
def evaluate(model, batches, loss_fn, micro_batch_size: int | None) -> float:
    """Token mean of `loss_fn` over all `batches`, run in micro-batches."""
    model.eval()
    weighted, total = 0.0, 0
    for batch in batches:
        for micro in micro_batches(batch, micro_batch_size):
            n = label_tokens(micro)
            if n:
                weighted += loss_fn(model, micro).item() * n
                total += n
    model.train()
    return weighted / total if total else float("nan")


def adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms and biases)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def optimizer_step(
    model, optimizer, batch, loss_fn, lr: float, grad_clip: float, micro_batch_size, bf16: bool, after_step
):
    """One step on `batch` at learning rate `lr` (gradients clipped, then `after_step(model)`); returns its loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, batch, loss_fn, micro_batch_size, bf16)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if after_step is not None:
        after_step(model)
    return loss.item()


class TrainingLog:
    """The rows train returns, one per evaluation (see train), and what they count between evaluations."""

    def __init__(self, validation_loss, optimizer, precision: str, run, log_step_offset: int):
        self.validation_loss, self.optimizer, self.precision = validation_loss, optimizer, precision
        self.run, self.log_step_offset = run, log_step_offset
        self.rows, self.tokens, self.start, self.recent = [], 0, time.time(), []
        self.window = {"tokens": 0, "seconds": 0.0}  # since the previous row
        self.train_seconds = 0.0

    def add_step(self, loss: float, tokens: int, seconds: float) -> None:
        self.recent.append(loss)
        self.tokens += tokens
        self.window["tokens"] += tokens
        self.window["seconds"] += seconds
        self.train_seconds += seconds

    def record(self, step: int) -> dict:
        window = self.window
        row = {
            "step": step,
            "tokens": self.tokens,
            "train_loss": sum(self.recent) / len(self.recent) if self.recent else float("nan"),
            "val_loss": self.validation_loss(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": round(time.time() - self.start, 2),
            "train_seconds": round(self.train_seconds, 2),
            "tokens_per_s": round(window["tokens"] / window["seconds"], 1) if window["seconds"] else float("nan"),
            "precision": self.precision,
        }
        self.rows.append(row)
        self.recent.clear()
        window.update(tokens=0, seconds=0.0)
        if self.run is not None:
            self.run.log(row, step=step + self.log_step_offset)
        return row


def train(
    model,
    batches,
    val_batches: list,
    *,
    steps: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    eval_every: int,
    bf16,
    micro_batch_size: int | None,
    run=None,
    loss_fn=causal_lm_loss,
    after_step=None,
    desc: str = "train",
    grad_clip: float = 1.0,
    log_step_offset: int = 0,
) -> list[dict]:
    """Train `model` for `steps` batches drawn from the iterator `batches`.

    `after_step(model)` runs after every optimizer step (fine-tuning uses it to hold
    pruning masks). `bf16` is "auto", True or False (see sd2.precision). A second stage on
    the same W&B run passes `log_step_offset` (W&B drops steps that go back). A step's batch
    runs as forward/backward passes of `micro_batch_size` sequences (None: all at once; see
    accumulate_gradients), validation too. Returns one row per evaluation: step, trained
    tokens, train and validation loss (token means), learning rate, wall seconds, seconds
    spent in training steps, training tokens/s since the previous row (evaluation excluded)
    and the precision (write it with `write_csv`).
    """
    device_type = next(model.parameters()).device.type
    use_bf16, why = resolve_bf16(bf16, device_type)
    print(f"{desc}: {why}", flush=True)
    optimizer = adamw(model, lr, weight_decay)
    validation_loss = functools.partial(evaluate, model, val_batches, loss_fn, micro_batch_size)
    log = TrainingLog(validation_loss, optimizer, precision_name(use_bf16), run, log_step_offset)
    model.train()
    log.record(0)
    bar = tqdm(range(1, steps + 1), desc=desc, unit="step", mininterval=5)
    for step in bar:
        batch = next(batches)
        tick = time.perf_counter()
        step_lr = lr_at(step - 1, steps, lr, warmup_steps)
        loss = optimizer_step(
            model, optimizer, batch, loss_fn, step_lr, grad_clip, micro_batch_size, use_bf16, after_step
        )
        n = int((batch["labels"] != -100).sum())
        log.add_step(loss, n, time.perf_counter() - tick)
        if step % eval_every == 0 or step == steps:
            row = log.record(step)
            bar.set_postfix(train=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}")
    model.eval()
    return log.rows


def throughput(history: list[dict]) -> float:
    """Mean training tokens/s of a run, evaluation time excluded."""
    last = history[-1]
    return round(last["tokens"] / last["train_seconds"], 1) if last["train_seconds"] else float("nan")


def write_csv(path, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---- prompt/response data (supervised stages: instruct tuning, fine-tuning) ----

GROUP_BATCHES = 8  # batches sorted by length together (benchmarks/length_grouping.py)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right padding; padded positions are masked out of attention and the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def shuffled_batches(
    examples: list[dict], batch_size: int, pad_id: int, seed: int, device="cpu", group: int = GROUP_BATCHES
):
    """Endless batches, a new seeded permutation every epoch, of examples of similar length.

    A batch is padded to its longest example, and prompt/response lengths vary several-fold,
    so each run of `group` batches of the permutation is sorted by length before it is cut
    into batches (their order shuffled again): the batches stay random samples of the data
    while most of the padding, which costs as much compute as real tokens, goes.
    """
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        batches = []
        for start in range(0, len(order), batch_size * group):
            window = sorted(order[start : start + batch_size * group], key=lambda j: len(examples[j]["input_ids"]))
            batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            batch = collate([examples[j] for j in batches[b]], pad_id)
            yield {k: v.to(device) for k, v in batch.items()}


def split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices; at least one of each."""
    if n < 2:
        raise ValueError(f"fine-tuning needs at least 2 examples (1 for validation), got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])
