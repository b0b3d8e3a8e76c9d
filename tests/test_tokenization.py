"""The two tokenizer families round-trip code exactly and genuinely differ."""

import pytest
from transformers import AutoTokenizer

SAMPLES = [
    'def f(x):\n    """Return x squared."""\n    return x ** 2\n',
    "class A:\n\tpass\n\n\n# comment  with  spaces\nprint('hi', end='')  \n",
    "for i in range(10):\n        if i % 2:\n            continue\n",
]


@pytest.mark.parametrize("fixture", ["byte_tokenizer_dir", "meta_tokenizer_dir"])
def test_round_trip(request, fixture, stdlib_texts):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(fixture))
    for text in SAMPLES + [t[:2000] for t in stdlib_texts[:5]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_families_differ(byte_tokenizer_dir, meta_tokenizer_dir):
    a = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    b = AutoTokenizer.from_pretrained(meta_tokenizer_dir)
    assert a.convert_ids_to_tokens(a(" x")["input_ids"])[0].startswith("Ġ")
    assert b.convert_ids_to_tokens(b(" x")["input_ids"])[0].startswith("▁")
    # Neither vocabulary is a subset of the other, even with the space marks aligned.
    va = set(a.get_vocab())
    vb = {t.replace("▁", "Ġ") for t in b.get_vocab()}
    assert va - vb and vb - va
    assert a.eos_token == b.eos_token == "<|endoftext|>" and a.pad_token_id is not None


def test_unknown_kind(tmp_path):
    from sd2.tokenization import train_tokenizer

    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer("wordpiece", 300, ["a"], tmp_path)


def test_checkpoint_keeps_its_tokenizer(tiny_qwen_dir, meta_tokenizer_dir):
    """A qwen2 checkpoint with a tokenizer trained here must not be loaded as Qwen2Tokenizer."""
    from sd2.models import load_tokenizer

    text = SAMPLES[0] + SAMPLES[2]
    original, saved = AutoTokenizer.from_pretrained(meta_tokenizer_dir), load_tokenizer(tiny_qwen_dir)
    assert saved(text)["input_ids"] == original(text)["input_ids"]
    assert saved.decode(saved(text)["input_ids"]) == text
