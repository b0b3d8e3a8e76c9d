"""Rule self_distill: the target answers every fine-tuning prompt (self-data distillation).

Responses are stored as text, so a draft with another tokenizer can train on them.
Generation is batched with left padding; the attention mask (and the position ids
generate() derives from it) make each answer the same as an unbatched one. Prompts are
formatted by sd2.chat (the target's chat template), and each row keeps the formatted prompt
the target saw, so drafts train on the target's exact format. Answers are written in shards
as they come, so a killed job's requeue resumes instead of starting over.
With the config's engine.name vllm, vLLM answers each shard instead (sd2.engines), same rows.
"""

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from tqdm.auto import tqdm

from sd2 import chat, engines
from sd2.checkpoint import atomic_path, write_json
from sd2.measure.speculative import check_shipped_generation, generation_config
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
def generate_batch(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, chat_settings: dict | None = None
) -> list[dict]:
    """Answer `prompts` in one left-padded batch: response text, token ids and counts, whether EOS ended it.

    Each prompt is formatted by sd2.chat (its chat template where the tokenizer has one and
    chat_settings allow it); the decoding is exactly greedy or pure sampling (sd2.measure.speculative).
    """
    check_shipped_generation(model)
    tokenizer.padding_side = "left"
    ids = [chat.prompt_ids(tokenizer, p, chat_settings) for p in prompts]
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)
    out = model.generate(
        **enc, generation_config=generation_config(temperature, max_new_tokens, tokenizer.pad_token_id)
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


# ---- the rule: batches written in shards, so a requeued job resumes ----


def partial_dir(out_dir) -> Path:
    """Where the shards of an unfinished run of out_dir live (beside it, not inside: Snakemake clears outputs)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _resume(partial: Path, digest: str) -> dict[int, dict]:
    """Rows already answered, by shard number; an unmatched partial folder is removed, saying so."""
    if not partial.exists():
        return {}
    meta = partial / "settings.json"
    found = json.loads(meta.read_text())["digest"] if meta.exists() else None
    if found != digest:
        print(f"self-distill: {partial} was written with other settings ({found} != {digest}): starting over")
        shutil.rmtree(partial)
        return {}
    shards = {}
    for path in sorted(partial.glob("shard-*.json")):
        shard = json.loads(path.read_text())
        if shard["digest"] == digest:  # a shard left by other settings is answered again
            shards[shard["shard"]] = {int(k): v for k, v in shard["rows"].items()}
    print(f"self-distill: resuming from {len(shards)} shard(s) in {partial}")
    return shards


def drop_long_prompts(prompts, tokenizer, chat_settings: dict, max_tokens: int | None):
    """(the prompts whose formatted ids fit max_tokens, the ids of those that do not).

    A prompt is left out rather than cut: a cut instruction is a different instruction, and
    the memory plan (sd2.memory) sizes the job's batches for prompts of at most max_tokens.
    """
    if max_tokens is None:
        return prompts, []
    fits = [len(chat.prompt_ids(tokenizer, text, chat_settings)) <= max_tokens for text in prompts["prompt"]]
    if not any(fits):
        raise ValueError(f"distill.max_prompt_tokens={max_tokens}: every one of the {len(fits)} prompts is longer")
    too_long = [i for i, ok in zip(prompts["id"], fits) if not ok]
    return prompts.select([i for i, ok in enumerate(fits) if ok]), too_long


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
    gpus: int = 0,
) -> None:
    """Write a dataset to out_dir: id, prompt, response (the target's answer), original_response, and
    target_prompt / target_prompt_text (the formatted prompt the target saw, with and without its
    special tokens: see sd2.chat), finished (ended by an end-of-sequence token) and end_token (its text).

    settings: the config's distill section (max_new_tokens, temperature, batch_size, max_prompts,
    max_prompt_tokens, shard_batches) plus `chat` (the config's chat section). Prompts whose
    formatted ids are longer than max_prompt_tokens are left out (counted in settings.json).
    Every shard_batches batches the answers so far are written to `<out_dir>.partial/`; a rerun
    with the same settings resumes there; the finished dataset is written atomically and the
    partial folder removed.

    settings["engine"] (the config's engine section) picks transformers' generate or vLLM
    (sd2.engines: one llm.generate call per shard, tensor parallel over `gpus`); same rows either way.
    """
    max_new_tokens, temperature = settings["max_new_tokens"], settings["temperature"]
    batch_size, max_prompts = settings["batch_size"], settings.get("max_prompts")
    shard_batches = settings.get("shard_batches", 20)
    chat_settings = chat.resolve(settings.get("chat"))
    prompts = load_from_disk(str(prompts_dir))
    if max_prompts is not None:
        prompts = prompts.select(range(min(max_prompts, len(prompts))))
    tokenizer = load_tokenizer(target_dir, trust_remote_code)
    prompts, too_long = drop_long_prompts(prompts, tokenizer, chat_settings, settings.get("max_prompt_tokens"))
    engine = engines.resolve(settings.get("engine"))
    if engine["name"] == "vllm":
        longest = max(len(chat.prompt_ids(tokenizer, text, chat_settings)) for text in prompts["prompt"])
        model = engines.load_llm(
            target_dir,
            engine,
            dtype=dtype,
            gpus=gpus,
            seed=seed,
            trust_remote_code=trust_remote_code,
            max_model_len=longest + max_new_tokens,
        )
        eos = engines.eos_ids(target_dir, trust_remote_code)
    else:
        model = load_model(target_dir, trust_remote_code, dtype=dtype, device=default_device(), device_map=device_map)
    chat_record = chat.describe(tokenizer, chat_settings)

    texts, ids = list(prompts["prompt"]), list(prompts["id"])
    # Similar lengths in a batch waste less padding; the answers do not depend on the order
    # when greedy. Sampling is seeded per batch, so a resumed run draws what an uninterrupted one does.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    shards = [range(s, min(s + shard_batches, len(batches))) for s in range(0, len(batches), shard_batches)]
    digest = _digest(
        {
            "settings": {**settings, "chat": chat_settings, "shard_batches": shard_batches},
            "seed": seed,
            "target": str(target_dir),
            "prompts": _digest([ids, texts]),
        }
    )
    partial = partial_dir(out_dir)
    done = _resume(partial, digest)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(partial / "settings.json", {"digest": digest, "settings": settings, "seed": seed})

    answers: dict[int, dict] = {i: row for rows in done.values() for i, row in rows.items()}
    resumed = len(answers)
    start, new_tokens = time.time(), 0
    bar = tqdm(total=len(batches), desc="self-distill", unit="batch", mininterval=5)
    for number, shard in enumerate(shards):
        if number in done:
            bar.update(len(shard))
            continue
        if engine["name"] == "vllm":
            idx = [i for b in shard for i in batches[b]]
            answered = engines.generate(
                model,
                tokenizer,
                [texts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos=eos,
                seeds=[seed + i for i in idx],
                chat_settings=chat_settings,
            )
            pairs = list(zip(idx, answered))
            bar.update(len(shard))
        else:
            pairs = []
            for b in shard:
                torch.manual_seed(seed + b)
                idx = batches[b]
                out = generate_batch(
                    model,
                    tokenizer,
                    [texts[i] for i in idx],
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    chat_settings=chat_settings,
                )
                pairs += zip(idx, out)
                bar.update(1)
        rows = {}
        for i, row in pairs:
            end = row["new_ids"][-1:] if row["finished"] else []
            rows[i] = {
                **chat.target_views(tokenizer, row["prompt_ids"]),
                "response": row["response"],
                "finished": row["finished"],
                "end_token": tokenizer.decode(end, skip_special_tokens=False),
                "new_tokens": row["new_tokens"],
            }
            new_tokens += row["new_tokens"]
        write_json(partial / f"shard-{number:05d}.json", {"shard": number, "digest": digest, "rows": rows})
        answers.update(rows)
    bar.close()
    seconds = time.time() - start

    answers_in_order = [answers[i] for i in range(len(texts))]
    original = prompts["response"] if "response" in prompts.column_names else [None] * len(texts)
    columns = ("target_prompt", "target_prompt_text", "finished", "end_token")
    data = Dataset.from_dict(
        {
            "id": ids,
            "prompt": texts,
            "response": [a["response"] for a in answers_in_order],
            "original_response": original,
            **{c: [a[c] for a in answers_in_order] for c in columns},
        }
    )
    info = provenance(
        seed=seed,
        target=str(target_dir),
        prompts=str(prompts_dir),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        decoding="greedy" if temperature == 0 else "sampling (pure: no top-k, top-p or repetition penalty)",
        batch_size=batch_size,
        max_prompts=max_prompts,
        shard_batches=shard_batches,
        padding="left" if engine["name"] == "transformers" else None,
        engine=engine,
        chat=chat_record,
    )
    # sd2.chat compares this with a draft's tokenizer to pick the text the draft trains on.
    info["target_tokenizer"] = chat.tokenizer_fingerprint(tokenizer)
    generated = len(texts) - resumed
    info["stats"] = {
        "prompts": len(texts),
        "left_out_longer_than_max_prompt_tokens": {"count": len(too_long), "ids": too_long},
        "new_tokens": sum(a["new_tokens"] for a in answers_in_order),
        "finished_with_eos": sum(a["finished"] for a in answers_in_order),
        "resumed_prompts": resumed,
        "generated_prompts": generated,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1),
    }
    with atomic_path(out_dir) as tmp:
        data.save_to_disk(str(tmp))
        write_json(tmp / "settings.json", info)
    shutil.rmtree(partial)
