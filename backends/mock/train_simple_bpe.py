"""Rebuilds simple_bpe.json: a small byte-level BPE trained on Python's own offline help text.

Run once by a developer (`python -m backends.mock.train_simple_bpe`); the result ships in the package.
"""
from pathlib import Path

from pydoc_data.topics import topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 1024
EOS_TOKEN = "<|endoftext|>"


def train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(topics.values(), trainer=trainer)
    return tokenizer


if __name__ == "__main__":
    out = Path(__file__).with_name("simple_bpe.json")
    train().save(str(out))
    print(f"wrote {out}")
