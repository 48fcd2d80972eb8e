"""The `python-stdlib` text corpus: the Python standard library's own `.py` source, which every
interpreter ships, split by file into train / held-out / test, with a byte-level BPE tokenizer.

Which files: every `.py` file under `sysconfig.get_paths()["stdlib"]`, except
- anything under `site-packages` or `dist-packages` (installed packages, not the standard library),
- the test suites: any path with a folder named `test`, `tests` or `idle_test` (half of the bytes,
  full of deliberately malformed files and data blobs),
- machine-generated files: `_sysconfigdata_*.py` (the build's configuration, different on every
  build) and files over `MAX_FILE_BYTES` (only `pydoc_data/topics.py`, a 750 KB string table).
Files are read as UTF-8 with undecodable bytes replaced, and newlines normalised to "\\n".

The split is by file and fixed: the first 8 bytes of sha256(relative path, POSIX form) as an
integer, modulo 100: below 90 train, below 95 held-out, else test. It depends on nothing but the
path, so adding or removing a file moves no other file. On CPython 3.11.7 that is 656 / 41 / 35
files, 9.85 / 0.78 / 0.70 MB, 2,853,999 / 220,981 / 199,938 tokens (digest 60d3c457f36e...); no
further cap: the trainer draws random windows, so the corpus size does not set the training time.
`corpus_digest` hashes every split's (path, content sha256) list; a model's metrics.json records
it, and `check_digest` refuses to compare numbers measured on a different corpus (another Python
version).

The tokenizer (`train_tokenizer`): byte-level BPE from the `tokenizers` library, trained on the
train files only, `VOCAB_SIZE` = 4096 entries including the one special token `<|endoftext|>`
that separates files; byte-level, so every text round-trips exactly.
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IntraFusionError

DATASET = "python-stdlib"
SPLITS = ("train", "heldout", "test")
VOCAB_SIZE = 4096
END_OF_TEXT = "<|endoftext|>"
MAX_FILE_BYTES = 300_000
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    """The folder of this interpreter's standard library source."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split ("train", "heldout" or "test") of a file, from its POSIX relative path alone."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "heldout" if bucket < 95 else "test"


def corpus_files(root: Path | None = None) -> dict[str, list[str]]:
    """{split: sorted POSIX paths relative to `root` (default: stdlib_root())} of the corpus's
    files, selected as the module docstring says."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise IntraFusionError(f"the {DATASET} corpus folder {root} does not exist; "
                               "give an existing folder of .py files")
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if (_SKIPPED_FOLDERS & set(relative.parts[:-1]) or relative.name.startswith("_sysconfigdata")
                or not path.is_file() or path.stat().st_size > MAX_FILE_BYTES):
            continue
        splits[split_of(relative.as_posix())].append(relative.as_posix())
    empty = [s for s in SPLITS if not splits[s]]
    if empty:
        raise IntraFusionError(f"{root} holds no .py files of the {DATASET} corpus's "
                               f"{' and '.join(empty)} split; give the folder of a Python standard library")
    return splits


def read_source(root: Path, relative_path: str) -> str:
    """The text of one corpus file (UTF-8, undecodable bytes replaced, "\\n" newlines)."""
    data = (Path(root) / relative_path).read_bytes()
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def corpus_digest(root: Path, files: dict[str, list[str]]) -> str:
    """sha256 over every split's file paths and contents: equal digests, equal corpora."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for name in files[split]:
            content = hashlib.sha256(read_source(root, name).encode()).hexdigest()
            digest.update(f"{split}\t{name}\t{content}\n".encode())
    return digest.hexdigest()


def check_digest(expected: str, actual: str, root: Path) -> None:
    """IntraFusionError unless the corpus at `root` (digest `actual`) is the one a model was
    trained and measured on (digest `expected`)."""
    if expected != actual:
        raise IntraFusionError(
            f"the {DATASET} corpus at {root} (digest {actual[:12]}) is not the one the model was "
            f"trained on (digest {expected[:12]}): another Python version; its perplexities would "
            "not be comparable, so use the Python the model's metrics.json names")


@dataclass(frozen=True)
class Corpus:
    """The corpus's folder, its files by split and their digest."""
    root: Path
    files: dict
    digest: str

    def texts(self, split: str) -> list[str]:
        """The texts of one split's files, in sorted path order."""
        if split not in SPLITS:
            raise IntraFusionError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return [read_source(self.root, name) for name in self.files[split]]


def load_corpus(root: Path | None = None) -> Corpus:
    """The corpus at `root` (default: this interpreter's standard library)."""
    root = Path(root) if root is not None else stdlib_root()
    files = corpus_files(root)
    return Corpus(root, files, corpus_digest(root, files))


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise IntraFusionError("the language model needs the tokenizers package: "
                               "pip install -r requirements.txt (or the 'lm' extra)") from None
    return tokenizers


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` with `vocab_size` entries, trained on `texts`
    (deterministic: the same texts give the same tokenizer)."""
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                     special_tokens=[END_OF_TEXT],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_from_json(text: str, source: Path | str):
    """The tokenizer serialised as `text` (tokenizer.json's content); IntraFusionError if it is
    not a tokenizer with the end-of-text token."""
    tk = _tokenizers()
    try:
        json.loads(text)
        tokenizer = tk.Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own exception types for malformed JSON
        raise IntraFusionError(f"{source} is not a tokenizer.json ({type(exc).__name__})") from None
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise IntraFusionError(f"{source} has no {END_OF_TEXT} token; it is not this corpus's tokenizer")
    return tokenizer


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """(N,) int64: the token ids of `texts`, each followed by the end-of-text token."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(end)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: torch.Tensor, batch_size: int, length: int,
                   generator: torch.Generator) -> torch.Tensor:
    """(batch_size, length + 1) windows of `tokens` (N,) at uniformly random starts drawn from
    `generator`: inputs are [:, :-1], next-token targets [:, 1:]."""
    if len(tokens) < length + 1:
        raise IntraFusionError(f"the training split has {len(tokens)} tokens, fewer than one "
                               f"window of {length + 1}; use a shorter --context")
    starts = torch.randint(0, len(tokens) - length, (batch_size,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length + 1)]


def eval_windows(tokens: torch.Tensor, length: int) -> list[torch.Tensor]:
    """`tokens` (N,) cut in order into windows of length + 1 that overlap by one token, so each
    token after the first is a target exactly once: (W, length + 1) full windows, then a (1, T)
    tail window (2 <= T <= length) if tokens remain."""
    full = max(len(tokens) - 1, 0) // length
    windows = [tokens[: full * length + 1].unfold(0, length + 1, length)] if full else []
    rest = tokens[full * length:]
    if len(rest) >= 2:
        windows.append(rest[None])
    return windows
