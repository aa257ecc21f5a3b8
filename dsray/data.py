"""Tokenizer and batches for the demo/train CLI: UTF-8 bytes as tokens, random windows of a text file.

Pure python/torch (no ray). Shape legend: B batch, S sequence length.

The packaged corpus (`default_corpus_path()`, ~0.9 MB of Shakespeare, see `dsray/data/CORPUS.md`)
is small enough to keep in the repo and big enough that a debug-size model visibly learns from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch


class ByteTokenizer:
    """UTF-8 bytes 0..255 are token ids; three specials follow. Lossless for any text, no vocab file."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Specials (and any id >= 256, e.g. an untrained model's extra vocab) are skipped; a byte
        sequence cut mid-character decodes to U+FFFD instead of raising."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def default_corpus_path() -> Path:
    """The packaged `dsray/data/corpus.txt`."""
    return Path(__file__).resolve().parent / "data" / "corpus.txt"


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist (or is not a file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not UTF-8: {e}") from None


class TextBatches:
    """Random windows `[B, S]` of one tokenized text; deterministic for a given seed.

    `path_or_text`: a `Path` is always a file; a `str` containing a newline is the text itself,
    any other `str` is a file path (use `TextBatches.from_text` for one-line text).
    The token stream has no BOS: windows start anywhere in the text, as in nanoGPT.
    Targets are the batch shifted by one (`logits[:, :-1]` against `batch[:, 1:]`).

    The last `val_fraction` of the tokens is held out. `split="train"` draws `next_batch()` from the
    rest, `split="val"` from the held-out part; `val_batch()` always returns the same held-out batch.
    """

    def __init__(
        self,
        path_or_text: str | Path,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        split: str = "train",
        val_fraction: float = 0.05,
    ) -> None:
        if isinstance(path_or_text, Path) or "\n" not in path_or_text:
            path = Path(path_or_text)
            text, self.source = _read_text(path), str(path)
        else:
            text, self.source = path_or_text, "<text>"
        self._init(text, seq_len, batch_size, seed, split, val_fraction)

    @classmethod
    def from_text(cls, text: str, seq_len: int, batch_size: int, seed: int = 0, split: str = "train",
                  val_fraction: float = 0.05) -> TextBatches:
        """Batches of `text` itself, even when it is a single line."""
        self = cls.__new__(cls)
        self.source = "<text>"
        self._init(text, seq_len, batch_size, seed, split, val_fraction)
        return self

    def _init(self, text: str, seq_len: int, batch_size: int, seed: int, split: str, val_fraction: float) -> None:
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TextBatches.{name} must be an int >= 1, got {v!r}")
        if split not in ("train", "val"):
            raise ValueError(f"TextBatches.split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"TextBatches.val_fraction must be in [0, 1), got {val_fraction!r}")
        self.tokenizer = ByteTokenizer()
        self.seq_len, self.batch_size, self.seed, self.split = seq_len, batch_size, seed, split
        raw = text.encode("utf-8")
        # bytes are the token ids: one copy into int64, no python list of a million ints
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
        n_val = int(len(tokens) * val_fraction)
        self.train_tokens = tokens[: len(tokens) - n_val]
        self.val_tokens = tokens[len(tokens) - n_val:]
        self.n_tokens = len(tokens)
        need = seq_len + 1
        mine = self.train_tokens if split == "train" else self.val_tokens
        if len(mine) < need:
            raise ValueError(
                f"text {self.source!r} is too short: the {split} split has {len(mine)} tokens "
                f"(of {len(tokens)} in all, val_fraction={val_fraction}), need at least seq_len+1 = {need}")
        self._tokens = mine
        self._gen = torch.Generator().manual_seed(seed)

    @staticmethod
    def _windows(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        # starts in [0, len - seq_len]: every window lies wholly inside the split
        starts_B = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=gen)
        idx_BS = starts_B[:, None] + torch.arange(seq_len)[None, :]
        return tokens[idx_BS]

    def next_batch(self) -> torch.Tensor:
        """LongTensor [batch_size, seq_len] of random windows of this split."""
        return self._windows(self._tokens, self.batch_size, self.seq_len, self._gen)

    def val_batch(self) -> torch.Tensor:
        """The same held-out LongTensor [batch_size, seq_len] on every call (comparable val losses)."""
        if len(self.val_tokens) < self.seq_len + 1:
            raise ValueError(
                f"text {self.source!r} is too short: the val split has {len(self.val_tokens)} tokens, need at least "
                f"seq_len+1 = {self.seq_len + 1}; raise val_fraction or use a longer text")
        gen = torch.Generator().manual_seed(self.seed + 1_000_003)
        return self._windows(self.val_tokens, self.batch_size, self.seq_len, gen)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()


def skewed_batch(
    vocab_size: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    hot_fraction: float = 0.9,
    n_hot_tokens: int = 4,
) -> torch.Tensor:
    """LongTensor [batch_size, seq_len] where a `hot_fraction` of positions draw from `n_hot_tokens` ids.

    Deliberately skewed so that routing collapses onto few experts unless the bias balances it.
    The hot ids do not depend on the seed (`i * (vocab_size // n_hot_tokens)`), so batches with
    different seeds keep hitting the same experts; the other positions are uniform over the vocab.
    """
    if vocab_size < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"skewed_batch: vocab_size, batch_size, seq_len must be >= 1, "
                         f"got {vocab_size}, {batch_size}, {seq_len}")
    if not 1 <= n_hot_tokens <= vocab_size:
        raise ValueError(f"skewed_batch: n_hot_tokens must be in [1, vocab_size={vocab_size}], got {n_hot_tokens}")
    if not 0.0 <= hot_fraction <= 1.0:
        raise ValueError(f"skewed_batch: hot_fraction must be in [0, 1], got {hot_fraction}")
    gen = torch.Generator().manual_seed(seed)
    hot_ids = torch.arange(n_hot_tokens) * (vocab_size // n_hot_tokens)
    uniform_BS = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    hot_BS = hot_ids[torch.randint(0, n_hot_tokens, (batch_size, seq_len), generator=gen)]
    is_hot_BS = torch.rand(batch_size, seq_len, generator=gen) < hot_fraction
    return torch.where(is_hot_BS, hot_BS, uniform_BS)
