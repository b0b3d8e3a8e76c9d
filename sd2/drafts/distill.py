"""Rule self_distill: the target answers every fine-tuning prompt (self-data distillation).

Responses are stored as text, so a draft with another tokenizer can train on them.
The config's engine section picks what generates them (sd2.generation: transformers' batched,
left-padded generate, or vLLM), with the same rows either way. Prompts are formatted by
sd2.chat (the target's chat template), and each row keeps the formatted prompt the target saw,
so drafts train on the target's exact format. Answers are written in shards as they come, so a
killed job's requeue resumes instead of starting over.
"""

import hashlib
import json
import shutil
import time
from pathlib import Path

from datasets import Dataset, load_from_disk
from tqdm.auto import tqdm

from sd2 import chat, generation
from sd2.checkpoint import atomic_path, write_json
from sd2.models import load_tokenizer
from sd2.provenance import provenance

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


def load_prompts(prompts_dir, tokenizer, settings: dict, chat_settings: dict):
    """(the prompts to answer: the first max_prompts that fit max_prompt_tokens, the ids of those left out)."""
    prompts = load_from_disk(str(prompts_dir))
    if settings["max_prompts"] is not None:
        prompts = prompts.select(range(min(settings["max_prompts"], len(prompts))))
    return drop_long_prompts(prompts, tokenizer, chat_settings, settings["max_prompt_tokens"])


def plan(texts: list[str], batch_size: int, shard_batches: int) -> tuple[list[list[int]], list[range]]:
    """(batches of prompt indices, shards of batch numbers).

    Similar lengths in a batch waste less padding; the answers do not depend on the order when
    greedy. Sampling is seeded per batch (per prompt with vLLM), so a resumed run draws what an
    uninterrupted one does.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    shards = [range(s, min(s + shard_batches, len(batches))) for s in range(0, len(batches), shard_batches)]
    return batches, shards


def shard_rows(tokenizer, pairs) -> dict[int, dict]:
    """A shard's rows by prompt index, from the engine's (prompt index, row) pairs."""
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
    return rows


def answer_shards(engine, texts, batches, shards, *, done: dict, partial: Path, digest: str, settings: dict):
    """Every prompt's row by index: the shards in `done` as they are, the others generated and written to `partial`.

    Returns (rows, new tokens generated here).
    """
    answers: dict[int, dict] = {i: row for rows in done.values() for i, row in rows.items()}
    new_tokens = 0
    bar = tqdm(total=len(batches), desc="self-distill", unit="batch", mininterval=5)
    for number, shard in enumerate(shards):
        if number in done:
            bar.update(len(shard))
            continue
        pairs = engine.generate(
            texts,
            {b: batches[b] for b in shard},
            max_new_tokens=settings["max_new_tokens"],
            temperature=settings["temperature"],
            bar=bar,
        )
        rows = shard_rows(engine.tokenizer, pairs)
        new_tokens += sum(row["new_tokens"] for row in rows.values())
        write_json(partial / f"shard-{number:05d}.json", {"shard": number, "digest": digest, "rows": rows})
        answers.update(rows)
    bar.close()
    return answers, new_tokens


def dataset(prompts, answers: dict[int, dict]) -> Dataset:
    """The rule's dataset: id, prompt, the target's response and the original one, the target's views, endings."""
    texts = list(prompts["prompt"])
    in_order = [answers[i] for i in range(len(texts))]
    original = prompts["response"] if "response" in prompts.column_names else [None] * len(texts)
    columns = ("target_prompt", "target_prompt_text", "finished", "end_token")
    return Dataset.from_dict(
        {
            "id": list(prompts["id"]),
            "prompt": texts,
            "response": [a["response"] for a in in_order],
            "original_response": original,
            **{c: [a[c] for a in in_order] for c in columns},
        }
    )


def run_info(engine, target_dir, prompts_dir, settings: dict, seed: int, chat_record: dict) -> dict:
    """The dataset's provenance: decoding, batching, engine and prompt format, and the target's tokenizer."""
    temperature = settings["temperature"]
    info = provenance(
        seed=seed,
        target=str(target_dir),
        prompts=str(prompts_dir),
        max_new_tokens=settings["max_new_tokens"],
        temperature=temperature,
        decoding="greedy" if temperature == 0 else "sampling (pure: no top-k, top-p or repetition penalty)",
        batch_size=settings["batch_size"],
        max_prompts=settings["max_prompts"],
        shard_batches=settings["shard_batches"],
        padding=engine.padding,
        engine=engine.settings,
        chat=chat_record,
    )
    # sd2.chat compares this with a draft's tokenizer to pick the text the draft trains on.
    info["target_tokenizer"] = chat.tokenizer_fingerprint(engine.tokenizer)
    return info


def run_stats(answers: dict, *, too_long: list, resumed: int, new_tokens: int, seconds: float) -> dict:
    """Counts of the run: prompts, left out, tokens, EOS endings, resumed and generated prompts, speed."""
    return {
        "prompts": len(answers),
        "left_out_longer_than_max_prompt_tokens": {"count": len(too_long), "ids": too_long},
        "new_tokens": sum(a["new_tokens"] for a in answers.values()),
        "finished_with_eos": sum(a["finished"] for a in answers.values()),
        "resumed_prompts": resumed,
        "generated_prompts": len(answers) - resumed,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(new_tokens / max(seconds, 1e-9), 1),
    }


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
    max_prompt_tokens, shard_batches) plus `chat` and `engine` (the config's chat and engine
    sections). Prompts whose formatted ids are longer than max_prompt_tokens are left out (counted
    in settings.json). Every shard_batches batches the answers so far are written to
    `<out_dir>.partial/`; a rerun with the same settings resumes there; the finished dataset is
    written atomically and the partial folder removed. With vLLM each shard is one llm.generate
    call, tensor parallel over `gpus`.
    """
    chat_settings = chat.resolve(settings.get("chat"))
    tokenizer = load_tokenizer(target_dir, trust_remote_code)
    prompts, too_long = load_prompts(prompts_dir, tokenizer, settings, chat_settings)
    texts = list(prompts["prompt"])
    loading = {"trust_remote_code": trust_remote_code, "dtype": dtype, "device_map": device_map}
    engine = generation.engine(
        settings["engine"], target_dir, tokenizer, chat_settings, seed=seed, gpus=gpus, loading=loading
    )
    engine.start(texts, settings["max_new_tokens"])
    chat_record = chat.describe(tokenizer, chat_settings)

    batches, shards = plan(texts, settings["batch_size"], settings["shard_batches"])
    fingerprint = {"settings": {**settings, "chat": chat_settings}, "seed": seed, "target": str(target_dir)}
    digest = _digest({**fingerprint, "prompts": _digest([list(prompts["id"]), texts])})
    partial = partial_dir(out_dir)
    done = _resume(partial, digest)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(partial / "settings.json", {"digest": digest, "settings": settings, "seed": seed})

    start = time.time()
    answers, new_tokens = answer_shards(
        engine, texts, batches, shards, done=done, partial=partial, digest=digest, settings=settings
    )
    seconds = time.time() - start
    info = run_info(engine, target_dir, prompts_dir, settings, seed, chat_record)
    resumed = sum(len(rows) for rows in done.values())
    info["stats"] = run_stats(answers, too_long=too_long, resumed=resumed, new_tokens=new_tokens, seconds=seconds)
    with atomic_path(out_dir) as tmp:
        dataset(prompts, answers).save_to_disk(str(tmp))
        write_json(tmp / "settings.json", info)
    shutil.rmtree(partial)
