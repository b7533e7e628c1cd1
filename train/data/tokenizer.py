"""Tokenizers for data preparation: built-in bytes, any Hugging Face `tokenizer.json`, or a BPE trained on
the corpus with the `tokenizers` library. All share encode / decode / vocab_size / eos_id / spec."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>")


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 ends a document."""

    vocab_size = 257
    eos_id = 256
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json file."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tok = Tokenizer.from_file(str(path))
        names = [eos_token] if eos_token else list(EOS_CANDIDATES)
        ids = [self.tok.token_to_id(n) for n in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"{path}: no end-of-document token among {names}; pass --eos-token")
        self.eos_id = found[0]
        self.vocab_size = self.tok.get_vocab_size()
        self.spec = str(self.path)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))


def train_bpe(documents: Iterable[str], vocab_size: int, out_dir: Path) -> HFTokenizer:
    """Byte-level BPE trained on the documents, saved as out_dir/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return HFTokenizer(out_dir / "tokenizer.json", "<|endoftext|>")


def build_tokenizer(spec: str, documents: Iterable[str] | None = None, out_dir: Path | None = None,
                    eos_token: str | None = None):
    """"byte", a path to tokenizer.json, or "bpe:<vocab_size>" (trained on `documents`, saved in out_dir)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit() or int(size) < 300:
            raise ValueError(f"--tokenizer {spec}: expected bpe:<vocab size >= 300>")
        if documents is None or out_dir is None:
            raise ValueError("training a BPE needs the corpus and an output directory")
        return train_bpe(documents, int(size), out_dir)
    if not Path(spec).is_file():
        raise ValueError(f"--tokenizer {spec!r}: not 'byte', 'bpe:<N>' or an existing tokenizer.json file")
    return HFTokenizer(spec, eos_token)
