"""The CPython standard library sources as a character-level corpus.

Files are the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` (test suites and
``site-packages`` excluded), in sorted order of their relative paths. Every
:data:`VAL_EVERY`-th file goes to the validation split, the others to training, so the split is
by file (no line of a validation file is seen in training). The vocabulary is built from the
training text: every character occurring at least ``min_count`` times, in code point order, after
the unknown-character id ``0``.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EXCLUDED_DIRS",
    "VAL_EVERY",
    "CharCorpus",
    "stdlib_root",
    "stdlib_source_files",
    "load_stdlib_corpus",
    "batch_starts",
    "get_batch",
    "iterate_batches",
]

#: Directory names skipped when collecting the source files.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
#: Every ``VAL_EVERY``-th file (in sorted order) goes to the validation split.
VAL_EVERY = 10
#: Separator placed between files.
FILE_SEPARATOR = "\n\n"


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """Sorted ``*.py`` files under ``root`` (default :func:`stdlib_root`), skipping :data:`EXCLUDED_DIRS`."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root is not a directory: {root}")
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@dataclass
class CharCorpus:
    """Encoded train and validation text with its vocabulary.

    Attributes:
        train: ``(T_train,)`` int64 character ids.
        val: ``(T_val,)`` int64 character ids.
        chars: the vocabulary; id ``i + 1`` is ``chars[i]``, id ``0`` is any other character.
        num_files: ``(train files, validation files)``.
        digest: SHA-256 prefix of the raw text of both splits (identifies the corpus in results).
    """

    train: torch.Tensor
    val: torch.Tensor
    chars: str
    num_files: tuple[int, int]
    digest: str

    @property
    def vocab_size(self) -> int:
        """Number of ids (characters plus the unknown id)."""
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        """``(len(text),)`` int64 ids of ``text``."""
        return _encode(text, self.chars)

    def decode(self, ids: torch.Tensor) -> str:
        """Text of a 1-D id tensor (the unknown id becomes ``"\\ufffd"``)."""
        table = "\ufffd" + self.chars
        return "".join(table[i] for i in ids.tolist())

    def summary(self) -> dict:
        """JSON-serialisable description (sizes, vocabulary size, digest)."""
        return {
            "train_chars": int(self.train.numel()),
            "val_chars": int(self.val.numel()),
            "vocab_size": self.vocab_size,
            "train_files": self.num_files[0],
            "val_files": self.num_files[1],
            "digest": self.digest,
        }


def _encode(text: str, chars: str) -> torch.Tensor:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
    lut = np.zeros(int(max(codes.max(initial=0), alphabet.max(initial=0))) + 1, dtype=np.int64)
    lut[alphabet] = np.arange(1, len(chars) + 1)
    return torch.from_numpy(lut[codes])


def load_stdlib_corpus(
    root: Path | None = None,
    *,
    max_train_chars: int | None = None,
    max_val_chars: int | None = None,
    min_count: int = 20,
) -> CharCorpus:
    """Read, split and encode the standard library sources.

    Args:
        root: directory to read (default: the running interpreter's standard library).
        max_train_chars, max_val_chars: keep only the first characters of each split (``None``: all).
        min_count: minimum number of occurrences in the training text for a character to get an id.

    Returns:
        :class:`CharCorpus`.
    """
    files = stdlib_source_files(root)
    if len(files) < 2:
        raise ValueError(f"need at least two source files under {root or stdlib_root()}, found {len(files)}")
    train_parts: list[str] = []
    val_parts: list[str] = []
    for i, path in enumerate(files):
        text = path.read_bytes().decode("utf-8", errors="replace")
        (val_parts if i % VAL_EVERY == 0 else train_parts).append(text)
    train_text = FILE_SEPARATOR.join(train_parts)[:max_train_chars]
    val_text = FILE_SEPARATOR.join(val_parts)[:max_val_chars]
    counts = Counter(train_text)
    chars = "".join(sorted(c for c, n in counts.items() if n >= min_count))
    digest = hashlib.sha256((train_text + "\0" + val_text).encode("utf-8", errors="replace")).hexdigest()[:16]
    return CharCorpus(
        train=_encode(train_text, chars),
        val=_encode(val_text, chars),
        chars=chars,
        num_files=(len(train_parts), len(val_parts)),
        digest=digest,
    )


def batch_starts(num_tokens: int, context: int, batch_size: int, num_batches: int, seed: int) -> torch.Tensor:
    """Start offsets ``(num_batches, batch_size)`` of training windows, from a seeded generator.

    The same ``seed`` gives the same data order to every model of a study.
    """
    if num_tokens <= context + 1:
        raise ValueError(f"the split has {num_tokens} characters, fewer than context + 2 = {context + 2}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_tokens - context - 1, (num_batches, batch_size), generator=gen)


def get_batch(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets, each ``(B, context)`` int64, for window starts ``(B,)``."""
    idx = starts.unsqueeze(1) + torch.arange(context + 1)
    window = data[idx]
    return window[:, :-1], window[:, 1:]


def iterate_batches(
    data: torch.Tensor, context: int, batch_size: int, num_batches: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``num_batches`` ``(inputs, targets)`` pairs in a fixed, seeded order."""
    for starts in batch_starts(data.numel(), context, batch_size, num_batches, seed):
        yield get_batch(data, starts, context)
