"""Chat templates: the one place that turns prompts (and answers) into the token ids a model sees.

Every stage goes through here: self-distillation and the targets' cached eval
continuations (`prompt_ids`), fine-tuning (`encode_example`, `encode_dataset`) and pruning
calibration (`calibration_ids`). Where a tokenizer has a chat template and the config's
`chat.template` is "auto", the prompt is a user turn rendered with the generation prompt;
otherwise it is the raw text, tokenized as before templates existed (the demo's
from-scratch tokenizers have no template, so the demo sees exactly the ids it always did).

Self-distilled data (columns `target_prompt`, `target_prompt_text`, `finished`,
`end_token`, written by sd2.drafts.distill) is trained on in the target's format: a draft with
the target's tokenizer reads `target_prompt`, the decoded prompt ids with their special
tokens, tokenized without adding any (so it gets the target's exact ids); a draft with
another tokenizer reads `target_prompt_text`, the prompt ids decoded without special
tokens and re-tokenized with the draft's own, which is what transformers' universal
assisted generation (UAG) hands it when drafting.
"""

import hashlib
import json
from pathlib import Path

MODES = ("auto", "off")
DEFAULTS = {"template": "auto", "date_string": "26 Jul 2024", "system_prompt": None}
IGNORE = -100


def resolve(chat: dict | None) -> dict:
    """The config's chat section with its defaults filled in; raises naming a bad key."""
    chat = {**DEFAULTS, **(chat or {})}
    unknown = sorted(set(chat) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"chat settings: unknown key(s) {unknown} (known: {sorted(DEFAULTS)})")
    if chat["template"] not in MODES:
        raise ValueError(f"chat.template must be one of {MODES}, got {chat['template']!r}")
    return chat


def template(tokenizer, chat: dict | None) -> str | None:
    """The chat template this tokenizer uses under `chat`, or None for raw text."""
    chat = resolve(chat)
    found = getattr(tokenizer, "chat_template", None)
    if chat["template"] == "off" or not found:
        return None
    return found if isinstance(found, str) else json.dumps(found, sort_keys=True)


def describe(tokenizer, chat: dict | None) -> dict:
    """What a record says about the prompt format: template used or not, which one (hash), pinned values."""
    chat = resolve(chat)
    used = template(tokenizer, chat)
    return {
        "setting": chat["template"],
        "applied": used is not None,
        "template_sha256": None if used is None else hashlib.sha256(used.encode()).hexdigest(),
        "date_string": chat["date_string"] if used is not None else None,
        "system_prompt": chat["system_prompt"] if used is not None else None,
    }


def _messages(prompt: str, chat: dict, response: str | None = None) -> list[dict]:
    messages = [] if chat["system_prompt"] is None else [{"role": "system", "content": chat["system_prompt"]}]
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _render(tokenizer, messages: list[dict], chat: dict, *, generation_prompt: bool) -> str:
    # date_string pins Llama 3's "Today Date: ..." header (its default is the current date);
    # templates that do not use it ignore it.
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, date_string=chat["date_string"]
    )


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def prompt_ids(tokenizer, prompt: str, chat: dict | None) -> list[int]:
    """The token ids a model is given for a user prompt (the generation prompt included)."""
    chat = resolve(chat)
    if template(tokenizer, chat) is None:
        return _ids(tokenizer, prompt, True)
    # The rendered text carries the template's special tokens (BOS included) as text.
    return _ids(tokenizer, _render(tokenizer, _messages(prompt, chat), chat, generation_prompt=True), False)


def target_views(tokenizer, ids: list[int]) -> dict:
    """The two texts of prompt ids a target saw: with special tokens, and as UAG hands them to another tokenizer."""
    return {
        "target_prompt": tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        # The exact call transformers' different-tokenizer candidate generator makes.
        "target_prompt_text": tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True),
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary and special tokens: equal fingerprints read the same text the same way."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(tokenizer.all_special_tokens)
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


# ---- (prompt, answer) examples: ids and labels, the loss on the answer only ----


def _own_parts(tokenizer, prompt: str, response: str, finished: bool, chat: dict) -> tuple[list, list]:
    """(prompt ids, answer ids) in the tokenizer's own format; the end-of-turn only on a finished answer."""
    if template(tokenizer, chat) is None:
        end = [tokenizer.eos_token_id] if finished else []
        return _ids(tokenizer, prompt, True), _ids(tokenizer, response, False) + end
    head = _render(tokenizer, _messages(prompt, chat), chat, generation_prompt=True)
    full = _render(tokenizer, _messages(prompt, chat, response), chat, generation_prompt=False)
    if not full.startswith(head):
        raise ValueError(
            "chat template: the rendered conversation does not start with the rendered generation prompt, so the "
            f"answer's tokens cannot be told apart (prompt {prompt[:60]!r})"
        )
    rest = full[len(head) :]
    # Templates may trim the answer (Llama 3 does); what follows it is the end-of-turn.
    body = response.strip()
    cut = len(response) if rest.startswith(response) else rest.find(body) + len(body)
    if cut < len(body):
        raise ValueError(f"chat template: the answer is not found in the rendered conversation ({response[:60]!r})")
    answer, end_of_turn = rest[:cut], rest[cut:]
    answer_ids = _ids(tokenizer, answer, False) + (_ids(tokenizer, end_of_turn, False) if finished else [])
    return _ids(tokenizer, head, False), answer_ids


def _target_parts(tokenizer, row: dict, same_tokenizer: bool) -> tuple[list, list]:
    """(prompt ids, answer ids) of a self-distilled row, in the target's format (module docstring)."""
    if same_tokenizer:
        end = _ids(tokenizer, row["end_token"], False) if row["finished"] else []
        head = _ids(tokenizer, row["target_prompt"], False)
    else:
        end = [tokenizer.eos_token_id] if row["finished"] else []
        head = _ids(tokenizer, row["target_prompt_text"], True)
    return head, _ids(tokenizer, row["response"], False) + end


def pack(prompt: list[int], answer: list[int], seq_len: int) -> dict:
    """input_ids and labels (-100 on the prompt); a long prompt keeps its end and leaves room for the answer."""
    prompt = prompt[-(seq_len // 2) :]
    return {"input_ids": (prompt + answer)[:seq_len], "labels": ([IGNORE] * len(prompt) + answer)[:seq_len]}


def encode_example(
    tokenizer, prompt: str, response: str, seq_len: int, *, finished: bool = True, chat: dict | None = None
) -> dict:
    """A (prompt, response) example in the tokenizer's own format; loss on the answer and, if finished, its end
    (the end-of-text, or the template's end-of-turn), never on an answer cut off at a length limit."""
    return pack(*_own_parts(tokenizer, prompt, response, finished, resolve(chat)), seq_len)


def is_self_distilled(data) -> bool:
    return "target_prompt" in data.column_names


def data_format(tokenizer, data, data_dir, chat: dict | None) -> dict:
    """How rows of `data` are read by `tokenizer`: the target's format (self-distilled) or the tokenizer's own."""
    if not is_self_distilled(data):
        return {"format": "own", "chat": describe(tokenizer, chat)}
    settings_path = Path(data_dir) / "settings.json"
    if not settings_path.exists():
        raise FileNotFoundError(f"self-distilled data {data_dir} has no settings.json (the target's tokenizer)")
    distilled = json.loads(settings_path.read_text())
    same = distilled["target_tokenizer"] == tokenizer_fingerprint(tokenizer)
    return {
        "format": "target" if same else "target_text",
        "target_chat": distilled["settings"]["chat"],
        "why": "the target's tokenizer: its exact prompt ids"
        if same
        else "another tokenizer: the prompt text the target's ids decode to (what UAG feeds this draft)",
    }


def _rows(data):
    return (dict(zip(data.column_names, values)) for values in zip(*(data[c] for c in data.column_names)))


def _parts(tokenizer, data, fmt: dict, chat: dict | None):
    if fmt["format"] == "own":
        chat = resolve(chat)
        # Original responses (the stdlib's complete functions) are finished answers.
        return [_own_parts(tokenizer, r["prompt"], r["response"], True, chat) for r in _rows(data)]
    return [_target_parts(tokenizer, r, fmt["format"] == "target") for r in _rows(data)]


def encode_dataset(tokenizer, data, data_dir, chat: dict | None, seq_len: int) -> tuple[list[dict], dict]:
    """Every row as a fine-tuning example, and the record of the format used (for provenance)."""
    fmt = data_format(tokenizer, data, data_dir, chat)
    return [pack(p, a, seq_len) for p, a in _parts(tokenizer, data, fmt, chat)], fmt


def calibration_ids(tokenizer, data, data_dir, chat: dict | None, seq_len: int) -> tuple[list[list[int]], dict]:
    """Prompt + answer token ids per row in the format fine-tuning reads, truncated to seq_len.

    The prompt (as the format renders it) and the answer are tokenized as one text, as
    calibration always was; activations need no end-of-turn.
    """
    fmt = data_format(tokenizer, data, data_dir, chat)
    if fmt["format"] == "own":
        chat = resolve(chat)
        raw = template(tokenizer, chat) is None
        heads = [
            r["prompt"] if raw else _render(tokenizer, _messages(r["prompt"], chat), chat, generation_prompt=True)
            for r in _rows(data)
        ]
        add_special_tokens = raw
    else:
        column = "target_prompt" if fmt["format"] == "target" else "target_prompt_text"
        heads, add_special_tokens = data[column], fmt["format"] == "target_text"
    texts = [h + r for h, r in zip(heads, data["response"])]
    return [ids[:seq_len] for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]], fmt
