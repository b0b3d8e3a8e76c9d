"""Rule self_distill: the target answers every fine-tuning prompt (self-data distillation).

Responses are stored as text, so a draft with another tokenizer can train on them.
Generation is batched with left padding; the attention mask (and the position ids
generate() derives from it) make each answer the same as an unbatched one.
"""

import time

import torch
from datasets import Dataset, load_from_disk
from tqdm.auto import tqdm

from sd2.checkpoint import atomic_path, write_json
from sd2.models import default_device, load_model, load_tokenizer
from sd2.provenance import provenance


def decode_response(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of the new tokens, special tokens stripped.

    Decoded together with the prompt and cut after the decoded prompt, because some
    decoders (metaspace) drop a leading space when a sequence starts mid-text.
    """
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def _strip_padding(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float) -> list[dict]:
    """Answer `prompts` in one left-padded batch: response text, token ids and counts, whether EOS ended it."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    )
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    width = enc["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    rows = []
    for i in range(len(prompts)):
        prompt_ids = _strip_padding(enc["input_ids"][i], enc["attention_mask"][i])
        new_ids = out[i, width:].tolist()
        # generate() pads finished rows after their end-of-sequence token: cut there.
        end = next((j for j, t in enumerate(new_ids) if t in eos), None)
        finished = end is not None
        new_ids = new_ids[: end + 1] if finished else new_ids
        rows.append(
            {
                "response": decode_response(tokenizer, prompt_ids, new_ids),
                "new_tokens": len(new_ids),
                "finished": finished,
                "prompt_ids": prompt_ids,
                "new_ids": new_ids,
            }
        )
    return rows


def self_distill(
    target_dir,
    prompts_dir,
    out_dir,
    *,
    settings: dict,
    seed: int,
    trust_remote_code: bool = False,
    dtype="auto",
    device_map=None,
) -> None:
    """Write a dataset (id, prompt, response = the target's answer, original_response) to out_dir.

    settings: the config's distill section (max_new_tokens, temperature, batch_size, max_prompts).
    """
    max_new_tokens, temperature = settings["max_new_tokens"], settings["temperature"]
    batch_size, max_prompts = settings["batch_size"], settings.get("max_prompts")
    prompts = load_from_disk(str(prompts_dir))
    if max_prompts is not None:
        prompts = prompts.select(range(min(max_prompts, len(prompts))))
    tokenizer = load_tokenizer(target_dir, trust_remote_code)
    model = load_model(target_dir, trust_remote_code, dtype=dtype, device=default_device(), device_map=device_map)
    torch.manual_seed(seed)

    texts = prompts["prompt"]
    # Similar lengths in a batch waste less padding; the answers do not depend on the order
    # when greedy (sampling draws from one seeded stream, so it depends on the batching).
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[dict | None] = [None] * len(texts)
    start = time.time()
    for b in tqdm(range(0, len(order), batch_size), desc="self-distill", unit="batch", mininterval=5):
        idx = order[b : b + batch_size]
        for i, row in zip(
            idx,
            generate_batch(
                model, tokenizer, [texts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature
            ),
        ):
            answers[i] = row
    seconds = time.time() - start

    original = prompts["response"] if "response" in prompts.column_names else [None] * len(texts)
    data = Dataset.from_dict(
        {
            "id": prompts["id"],
            "prompt": texts,
            "response": [a["response"] for a in answers],
            "original_response": original,
        }
    )
    new_tokens = sum(a["new_tokens"] for a in answers)
    info = provenance(
        seed=seed,
        target=str(target_dir),
        prompts=str(prompts_dir),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        decoding="greedy" if temperature == 0 else "sampling (top_k=0, top_p=1)",
        batch_size=batch_size,
        max_prompts=max_prompts,
        padding="left",
    )
    info["stats"] = {
        "prompts": len(texts),
        "new_tokens": new_tokens,
        "finished_with_eos": sum(a["finished"] for a in answers),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1),
    }
    with atomic_path(out_dir) as tmp:
        data.save_to_disk(str(tmp))
        write_json(tmp / "settings.json", info)
