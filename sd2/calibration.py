"""Calibration data of the one-shot steps (pruning, GPTQ): a seeded sample of prompt + response rows."""

from datasets import Dataset, load_from_disk

from sd2 import chat


def calibration_set(
    calibration_dir, tokenizer, n: int, seq_len: int, seed: int, chat_settings: dict | None = None
) -> tuple[Dataset, dict]:
    """(n rows of prompt + response chosen with `seed`, tokenized as fine-tuning reads them and truncated to
    seq_len; the format used, see sd2.chat.data_format)."""
    ds = load_from_disk(str(calibration_dir))
    ds = ds.shuffle(seed=seed).select(range(min(n, len(ds))))
    ids, fmt = chat.calibration_ids(tokenizer, ds, calibration_dir, chat_settings, seq_len)
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}), fmt
