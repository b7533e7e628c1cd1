"""Tokenizers for data preparation: built-in bytes, any Hugging Face `tokenizer.json`, or a byte-level BPE
trained on the corpus with the `tokenizers` library. All share encode / encode_batch / decode / vocab_size /
eos_id / spec.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .corpus import read_documents

# end-of-document tokens of common tokenizer families, tried in order when no name is given
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<｜end▁of▁sentence｜>")
BPE_EOS = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 ends a document."""

    vocab_size = 257
    eos_id = 256
    spec = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def byte_level_tokenizer():
    """ByteTokenizer as a `tokenizers.Tokenizer` (what a Hugging Face export of a byte-tokenized run carries):
    byte b is id b, BPE_EOS is id 256 (ByteTokenizer.eos_id); a byte-level model without merges, its vocabulary
    the byte-level alphabet in byte order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable character byte-level tokenizers stand it for
    tok = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BPE_EOS, special=True)])
    assert tok.token_to_id(BPE_EOS) == ByteTokenizer.eos_id
    return tok


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json file; `eos_token` names the end-of-document token
    (default: the first of EOS_CANDIDATES the vocabulary has)."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path).resolve()
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own exception types for unreadable files
            raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from None
        self.eos_id = self._find_eos([eos_token] if eos_token else list(EOS_CANDIDATES))
        self.vocab_size = self.tok.get_vocab_size()
        self.spec = str(self.path)

    def _find_eos(self, names: list[str]) -> int:
        for name in names:
            if (i := self.tok.token_to_id(name)) is not None:
                return i
        raise ValueError(f"{self.path}: no end-of-document token among {names}; name one with --eos-token")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents at once (tokenizers spreads the batch over all cores)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def train_bpe(documents: Iterable[str], vocab_size: int, out_dir: str | Path) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style) trained on the documents, saved as out_dir/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer=trainer)
    path = Path(out_dir) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return HFTokenizer(path, BPE_EOS)


def build_tokenizer(spec: str, files: Iterable[Path] | None = None, out_dir: str | Path | None = None,
                    eos_token: str | None = None, text_key: str = "text"):
    """"byte", a path to a tokenizer.json, or "bpe:<vocab_size>" (trained on the documents of `files`,
    saved as out_dir/tokenizer.json)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        return train_bpe(read_documents(files, text_key), _bpe_size(spec, files, out_dir), out_dir)
    if not Path(spec).is_file():
        raise ValueError(f"tokenizer {spec!r}: not 'byte', 'bpe:<vocab size>' or an existing tokenizer.json")
    return HFTokenizer(spec, eos_token)


def _bpe_size(spec: str, files, out_dir) -> int:
    size = spec.removeprefix("bpe:")
    # 256 byte symbols + the end-of-document token must fit before any merge is learned
    if not size.isdigit() or int(size) < 258:
        raise ValueError(f"tokenizer {spec!r}: expected bpe:<vocab size >= 258>")
    if files is None or out_dir is None:
        raise ValueError(f"tokenizer {spec!r}: training a BPE needs the corpus files and an output directory")
    return int(size)
