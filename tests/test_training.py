"""Fine-tuning memory: micro-batches with accumulation, gradient checkpointing and the chunked loss
give the gradients of the plain full-batch step."""

import pytest
import torch

from sd2.chunked_loss import chunked_causal_lm_loss, default_chunk_tokens
from sd2.drafts import losses
from sd2.drafts.finetune import finetune_loss_fn
from sd2.drafts.losses import kl_loss, tvdpp_loss
from sd2.models import build_model, load_model
from sd2.training import accumulate_gradients, causal_lm_loss, collate, label_tokens, micro_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only contends

SIZES = dict(arch="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)


class Vocab:
    """What build_model reads from a tokenizer."""

    def __len__(self):
        return 97

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0


def model_of(tied=True, seed=0):
    return build_model({**SIZES, "tie_word_embeddings": tied}, Vocab(), seed).train()


def batch_of(n=8, seed=0):
    """Prompt/response examples of different lengths, right-padded; the responses differ several-fold in length."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        prompt, response = 3 + i % 4, 2 + 5 * (i % 3)
        ids = torch.randint(3, 97, (prompt + response,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return collate(examples, pad_id=0)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step_grads(model, batch, loss_fn, micro=None):
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, batch, loss_fn, micro)
    return loss.item(), grads(model)


def assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < tol, name


@pytest.mark.parametrize("micro", [1, 3])  # 3 does not divide the batch of 8
def test_accumulated_ce_step_equals_the_full_batch_step(micro):
    model, batch = model_of(), batch_of()
    full_loss, full = step_grads(model, batch, causal_lm_loss)
    loss, accumulated = step_grads(model, batch, causal_lm_loss, micro)
    assert abs(loss - full_loss) < 1e-6
    assert_same(full, accumulated)
    # The mean of micro-batch means weights tokens unequally: a different gradient.
    model.zero_grad(set_to_none=True)
    parts = micro_batches(batch, micro)
    sum(causal_lm_loss(model, m) / len(parts) for m in parts).backward()
    assert max((p.grad - full[n]).abs().max() for n, p in model.named_parameters()) > 1e-4


def test_accumulated_kl_step_equals_the_full_batch_step():
    model, teacher, batch = model_of(), model_of(seed=1).eval(), batch_of()
    loss_fn = finetune_loss_fn(losses.kl, teacher, chunk_tokens=5)
    full_loss, full = step_grads(model, batch, loss_fn)
    loss, accumulated = step_grads(model, batch, loss_fn, 3)
    assert full_loss > 1e-3 and abs(loss - full_loss) < 1e-6
    assert_same(full, accumulated)


def test_micro_batches_drop_only_padding():
    batch = batch_of()
    parts = micro_batches(batch, 3)
    assert [m["input_ids"].shape[0] for m in parts] == [3, 3, 2]
    assert sum(label_tokens(m) for m in parts) == label_tokens(batch)
    for m in parts:
        assert m["attention_mask"][:, -1].any()  # trimmed to its longest sequence
        assert m["input_ids"].shape[1] <= batch["input_ids"].shape[1]


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_the_plain_loss(tied):
    model, batch = model_of(tied), batch_of()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    plain_loss, plain = step_grads(model, batch, causal_lm_loss)
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: rows.append(out.shape[0]))
    loss, chunked = step_grads(model, batch, lambda m, b: chunked_causal_lm_loss(m, b, 7))
    assert abs(loss - plain_loss) < 1e-6
    assert_same(plain, chunked)
    # Logits only ever for one chunk of labelled positions: in forward, then again in backward.
    n = label_tokens(batch)
    assert max(rows) == 7 and sum(rows) == 2 * n


def test_chunked_distillation_losses_equal_the_full_logit_ones():
    model, teacher, batch = model_of(), model_of(seed=1).eval(), batch_of()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    tokens = torch.randint(0, 97, mask.shape, generator=torch.Generator().manual_seed(0))
    for full, chunked in [
        (kl_loss(logits, teacher_logits, mask), losses.kl(model, teacher, batch, 5)),
        (tvdpp_loss(logits, teacher_logits, mask, tokens), losses.tvdpp(model, teacher, batch, 5, tokens[mask])),
    ]:
        model.zero_grad(set_to_none=True)
        full.backward(retain_graph=True)
        expected = grads(model)
        model.zero_grad(set_to_none=True)
        chunked.backward()
        assert abs(full.item() - chunked.item()) < 1e-6 and abs(full.item()) > 1e-3
        assert_same(expected, grads(model))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama_dir):
    batch = batch_of()
    plain_model = load_model(tiny_llama_dir, dtype=torch.float32).train()
    plain_loss, plain = step_grads(plain_model, batch, causal_lm_loss, 4)
    model = load_model(tiny_llama_dir, dtype=torch.float32).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    loss, checkpointed = step_grads(model, batch, lambda m, b: chunked_causal_lm_loss(m, b, 16), 4)
    # Each of the 2 micro-batches: forward, and again in backward (a pre-hook: the recomputation stops
    # as soon as it has rebuilt what backward needs, before the block's forward hooks).
    assert len(calls) == 2 * 2
    assert abs(loss - plain_loss) < 1e-6
    assert_same(plain, checkpointed)


def test_default_chunk_keeps_one_chunk_of_fp32_logits_near_512_mib():
    assert default_chunk_tokens(128_256) == 1046
    assert default_chunk_tokens(4096) * 4096 * 4 == 2**29


def test_chunked_loss_refuses_models_whose_logits_are_transformed():
    model = model_of()
    model.config.final_logit_softcapping = 30.0  # as Gemma 2's forward applies after lm_head
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        chunked_causal_lm_loss(model, batch_of(), 16)
