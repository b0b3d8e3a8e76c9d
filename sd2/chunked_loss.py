"""Losses over the output layer in chunks of positions, so full-vocabulary logits never exist for a whole batch.

A causal LM's loss needs logits of shape (positions, vocabulary): for a Llama-3 draft
(vocabulary 128,256) at 4 x 2048 positions that is 4.2 GB in fp32, and the loss's
log-softmax and the logits' gradient add more of the same. Here the base model gives the
hidden states, only the positions that predict a label are kept (prompt and padding
positions never reach the output layer), and the output layer + loss run over chunks of
those positions, each under `torch.utils.checkpoint`: the forward pass keeps only a
chunk's inputs, and the backward pass recomputes one chunk's logits at a time.
The cost is a second forward pass through the output layer for each chunk (none when
all positions fit one chunk).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Elements of one chunk's fp32 logits: 512 MiB. About four tensors of that size are alive
# while a chunk runs backward (its logits, their fp32 copy, the softmax and the gradient),
# so about 2 GB, small beside a 1B-3B model's weights and optimizer state on one GPU.
LOGITS_BUDGET = 2**27

# Configs whose CausalLM forward does more than lm_head(hidden) (Gemma's soft-capping,
# Cohere's and Granite's scaling); computing logits from the hidden states would skip it.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def default_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk such that one chunk's fp32 logits hold LOGITS_BUDGET elements.

    1046 positions for a 128,256 vocabulary (a (1046 x hidden) by (hidden x 128,256)
    matmul still fills a GPU); 32,768 for the demo's 4,096, so the CPU demo's batches
    (16 x 192 positions) fit one chunk and pay no recomputation.
    """
    return max(1, LOGITS_BUDGET // vocab_size)


def check_plain_logits(model) -> None:
    """Raise unless the model's logits are its output layer on the final hidden states, nothing more."""
    transforms = [k for k in LOGIT_TRANSFORMS if getattr(model.config, k, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(
            f"{model.config.model_type}: its logits are not lm_head(hidden states) alone ({', '.join(transforms)}); "
            "the chunked loss does not support it"
        )


def labelled_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, labels, keep): the final hidden states of the positions that predict a label.

    Position t predicts token t + 1, as in transformers' own loss. `keep` is the (batch,
    length - 1) mask of those positions; hidden is (n, hidden size), labels (n,).
    """
    check_plain_logits(model)
    out = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return out[:, :-1][keep], labels[keep], keep


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer (tied to the input embeddings or not) on some positions' hidden states."""
    return model.get_output_embeddings()(hidden)


def chunk_sum(fn, chunk_tokens: int, *rows: torch.Tensor) -> torch.Tensor:
    """sum over chunks of `chunk_tokens` rows of fn(*chunk), each chunk recomputed in backward.

    `fn` must return a scalar that is a sum over its rows. One chunk runs directly: its
    activations are as large as any chunk's, so checkpointing would only cost time.
    """
    n = rows[0].shape[0]
    if n <= chunk_tokens:
        return fn(*rows)
    return sum(
        checkpoint(fn, *(r[i : i + chunk_tokens] for r in rows), use_reentrant=False) for i in range(0, n, chunk_tokens)
    )


def chunked_cross_entropy(model, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean cross-entropy of the output layer on `hidden` (n, hidden size) against `labels` (n,), in chunks."""

    def ce(h, y):
        return F.cross_entropy(output_logits(model, h).float(), y, reduction="sum")

    return chunk_sum(ce, chunk_tokens, hidden, labels) / max(1, labels.numel())


def chunked_causal_lm_loss(model, batch, chunk_tokens: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, as model(..., labels=...).loss computes it."""
    hidden, labels, _ = labelled_hidden(model, batch)
    return chunked_cross_entropy(model, hidden, labels, chunk_tokens)
