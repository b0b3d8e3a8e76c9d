import time

import pytest
from datasets import Dataset

from sd2 import chat
from sd2.calibration import calibration_set
from sd2.models import load_tokenizer

PROMPTS = [
    'def add(a, b):\n    """Return a + b."""\n',
    "import os\n",
    "def f(x):\n    return x ** 2  # ünïcode\n",
]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def answer_text(tok, example) -> str:
    """The decoded tokens that carry a loss."""
    return tok.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != -100])


@pytest.mark.parametrize("tokenizer", ["byte_tokenizer_dir", "meta_tokenizer_dir"])
def test_no_template_means_the_ids_of_today(request, tokenizer):
    """The demo's tokenizers have no template: the same prompt ids and fine-tuning examples as before templates."""
    tok = load_tokenizer(request.getfixturevalue(tokenizer))
    assert tok.chat_template is None
    for prompt in PROMPTS:
        assert chat.prompt_ids(tok, prompt, None) == tok(prompt)["input_ids"]
        response = "    return a + b\n"
        # The encoding training.encode made before sd2.chat existed.
        head = tok(prompt)["input_ids"]
        answer = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert chat.encode_example(tok, prompt, response, 512) == {
            "input_ids": head + answer,
            "labels": [-100] * len(head) + answer,
        }
    assert chat.describe(tok, None) == {
        "setting": "auto",
        "applied": False,
        "template_sha256": None,
        "date_string": None,
        "system_prompt": None,
    }


def test_llama3_prompt_is_a_user_turn_with_the_date_pinned(llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir)
    text = tok.decode(chat.prompt_ids(tok, "def f(x):", None))
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\ndef f(x):<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Unpinned, the template prints today's date: the prompts would change from day to day.
    unpinned = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert f"Today Date: {time.strftime('%d %b %Y')}" in unpinned
    other = tok.decode(chat.prompt_ids(tok, "def f(x):", {"date_string": "01 Jan 2030"}))
    assert "Today Date: 01 Jan 2030\n" in other
    # The special tokens are single ids, as in the real tokenizer.
    ids = chat.prompt_ids(tok, "def f(x):", None)
    assert ids[0] == tok.bos_token_id and ids.count(tok.convert_tokens_to_ids("<|eot_id|>")) == 2
    record = chat.describe(tok, None)
    assert record["applied"] and len(record["template_sha256"]) == 64 and record["date_string"] == "26 Jul 2024"


def test_qwen2_prompt_and_system_prompt(qwen2_tokenizer_dir):
    tok = load_tokenizer(qwen2_tokenizer_dir)
    assert tok.decode(chat.prompt_ids(tok, "import os\n", None)) == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nimport os\n<|im_end|>\n<|im_start|>assistant\n"
    )
    custom = tok.decode(chat.prompt_ids(tok, "import os\n", {"system_prompt": "Write Python."}))
    assert custom.startswith("<|im_start|>system\nWrite Python.<|im_end|>\n") and QWEN_SYSTEM not in custom
    assert chat.describe(tok, {"system_prompt": "Write Python."})["system_prompt"] == "Write Python."


@pytest.mark.parametrize("family", ["llama3_tokenizer_dir", "qwen2_tokenizer_dir"])
def test_template_off_is_raw_text(request, family):
    tok = load_tokenizer(request.getfixturevalue(family))
    off = {"template": "off"}
    assert chat.prompt_ids(tok, "def f(x):", off) == tok("def f(x):")["input_ids"]
    assert chat.describe(tok, off)["applied"] is False
    example = chat.encode_example(tok, "def f(x):", " return x", 64, finished=True, chat=off)
    assert answer_text(tok, example) == f" return x{tok.eos_token}"


@pytest.mark.parametrize(
    ("family", "answer", "end"),
    [
        # Llama 3 trims the message; its turn ends with <|eot_id|>.
        ("llama3_tokenizer_dir", "return x", "<|eot_id|>"),
        # ChatML keeps the message as is; <|im_end|> and the newline after it end the turn.
        ("qwen2_tokenizer_dir", " return x ", "<|im_end|>\n"),
    ],
)
def test_loss_on_assistant_tokens_end_of_turn_only_when_finished(request, family, answer, end):
    tok = load_tokenizer(request.getfixturevalue(family))
    prompt, response = "def f(x):\n", " return x "
    head = chat.prompt_ids(tok, prompt, None)
    finished = chat.encode_example(tok, prompt, response, 256, finished=True)
    assert finished["input_ids"][: len(head)] == head and finished["labels"][: len(head)] == [-100] * len(head)
    assert answer_text(tok, finished) == answer + end
    cut = chat.encode_example(tok, prompt, response, 256, finished=False)
    assert answer_text(tok, cut) == answer
    assert cut["input_ids"] == finished["input_ids"][: len(cut["input_ids"])]
    # The example is exactly the rendered conversation (minus the end-of-turn when cut off).
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
        date_string="26 Jul 2024",
    )
    assert tok.decode(finished["input_ids"]) == full


def test_long_prompt_keeps_its_end_and_room_for_the_answer(qwen2_tokenizer_dir):
    tok = load_tokenizer(qwen2_tokenizer_dir)
    example = chat.encode_example(tok, "x = 1\n" * 200, "return x", 64, finished=True)
    assert len(example["input_ids"]) <= 64 and sum(label != -100 for label in example["labels"]) > 0
    assert tok.decode(example["input_ids"]).endswith("<|im_start|>assistant\nreturn x<|im_end|>\n")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="chat.template"):
        chat.resolve({"template": "on"})
    with pytest.raises(ValueError, match="date"):
        chat.resolve({"date": "x"})


def test_calibration_of_original_data(tmp_path, byte_tokenizer_dir, qwen2_tokenizer_dir):
    rows = [{"id": f"r{i}", "prompt": p, "response": "    return 1\n"} for i, p in enumerate(PROMPTS)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path))
    raw = load_tokenizer(byte_tokenizer_dir)
    calib, fmt = calibration_set(tmp_path, raw, n=3, seq_len=8, seed=0)
    shuffled = Dataset.from_list(rows).shuffle(seed=0)
    # Without a template: the calibration texts of today, prompt + response as one string.
    expected = raw([p + r for p, r in zip(shuffled["prompt"], shuffled["response"])], truncation=True, max_length=8)
    assert calib["input_ids"] == expected["input_ids"] and fmt["format"] == "own"
    templated = load_tokenizer(qwen2_tokenizer_dir)
    calib, fmt = calibration_set(tmp_path, templated, n=3, seq_len=512, seed=0)
    assert fmt["chat"]["applied"]
    for ids, prompt in zip(calib["input_ids"], shuffled["prompt"]):
        assert templated.decode(ids) == templated.decode(chat.prompt_ids(templated, prompt, None)) + "    return 1\n"
