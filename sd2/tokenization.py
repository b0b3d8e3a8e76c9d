"""Tokenizer families trained here, so that two model families genuinely differ in vocabulary.

byte_bpe is a byte-level BPE (the GPT-2 / Llama-3 scheme: 'Ġ' marks a space);
metaspace_bpe is a SentencePiece-style BPE (the Llama-2 scheme: '▁' marks a space,
newlines are their own tokens). Their vocabularies overlap only partly, as Llama's and
Qwen's do, which is what the different-tokenizer (UAG) path of speculative decoding needs.
"""

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
# Indentation stays attached to the word after it; newlines stand alone.
METASPACE_SPLIT = Regex(r"\n|▁*[^▁\n]+|▁+")


def _byte_bpe(vocab_size: int):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer, {}


def _metaspace_bpe(vocab_size: int):
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(METASPACE_SPLIT, behavior="isolated")
    tok.decoder = decoders.Replace("▁", " ")
    # All of ASCII is in the alphabet, so any ASCII code round-trips even if the corpus lacks a character.
    ascii_chars = [chr(i) for i in range(32, 127)] + ["\t", "\n", "\r", "▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK], initial_alphabet=ascii_chars, show_progress=False
    )
    return tok, trainer, {"unk_token": UNK}


KINDS = {"byte_bpe": _byte_bpe, "metaspace_bpe": _metaspace_bpe}


def train_tokenizer(kind: str, vocab_size: int, texts, out_dir) -> PreTrainedTokenizerFast:
    """Train a tokenizer family on an iterable of texts; save it loadable by AutoTokenizer."""
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind '{kind}' (known: {sorted(KINDS)})")
    tok, trainer, extra = KINDS[kind](vocab_size)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
        **extra,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def copy_tokenizer(model_dir, out_dir):
    """A model's own tokenizer, for a from-scratch draft that must speak the target's vocabulary."""
    from sd2.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok
