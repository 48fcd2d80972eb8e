"""The python-stdlib corpus (intrafusion.experiments.corpus): the file selection and its fixed
split, the digest, the BPE tokenizer and the token windows, on a small fake library."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from intrafusion.errors import IntraFusionError
from intrafusion.experiments import corpus as c


def fake_source(i: int) -> str:
    """A few lines of Python that differ with i (repetitive, so a tiny model learns them)."""
    return (f"def function_{i}(value, scale={i % 7}):\n"
            f"    \"\"\"Return value times scale plus {i}.\"\"\"\n"
            f"    result = value * scale + {i}\n"
            "    if result > 100:\n"
            "        return result - 100\n"
            "    return result\n\n\n"
            f"class Thing{i}:\n    name = 'thing_{i}'\n\n    def size(self):\n        return len(self.name)\n")


def write_fake_corpus(root: Path, per_split: int = 3) -> dict[str, list[str]]:
    """Write `per_split` modules of each split (chosen by c.split_of) under `root`, nested in
    packages; return {split: sorted relative paths}."""
    chosen: dict[str, list[str]] = {s: [] for s in c.SPLITS}
    for i in itertools.count():
        name = f"pkg{i % 3}/mod_{i}.py"
        split = c.split_of(name)
        if len(chosen[split]) < per_split:
            chosen[split].append(name)
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(fake_source(i))
        if all(len(v) == per_split for v in chosen.values()):
            return {s: sorted(v) for s, v in chosen.items()}


def test_split_is_a_fixed_function_of_the_path_in_roughly_90_5_5():
    paths = [f"package_{i}/module_{i}.py" for i in range(4000)]
    splits = [c.split_of(p) for p in paths]
    assert splits == [c.split_of(p) for p in paths]
    fractions = {s: splits.count(s) / len(paths) for s in c.SPLITS}
    assert fractions["train"] == pytest.approx(0.90, abs=0.02)
    assert fractions["heldout"] == pytest.approx(0.05, abs=0.015)
    assert fractions["test"] == pytest.approx(0.05, abs=0.015)


def test_corpus_files_are_disjoint_sorted_and_skip_non_library_files(tmp_path):
    expected = write_fake_corpus(tmp_path)
    skipped = ["site-packages/pkg/x.py", "test/test_x.py", "email/tests/t.py",
               "_sysconfigdata__linux.py", "__pycache__/a.py"]
    for name in skipped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    (tmp_path / "big.py").write_text("#" * (c.MAX_FILE_BYTES + 1))
    (tmp_path / "notes.txt").write_text("not python\n")
    files = c.corpus_files(tmp_path)
    assert files == expected
    every = [name for split in c.SPLITS for name in files[split]]
    assert len(every) == len(set(every)) == 3 * len(c.SPLITS)


def test_a_folder_without_every_split_is_refused(tmp_path):
    with pytest.raises(IntraFusionError, match="does not exist"):
        c.corpus_files(tmp_path / "missing")
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(IntraFusionError, match="split"):
        c.corpus_files(tmp_path)


def test_digest_changes_with_a_file_and_check_digest_refuses_another_corpus(tmp_path):
    files = write_fake_corpus(tmp_path)
    before = c.load_corpus(tmp_path)
    assert c.load_corpus(tmp_path).digest == before.digest
    (tmp_path / files["test"][0]).write_text("changed = True\n")
    after = c.load_corpus(tmp_path)
    assert after.digest != before.digest and after.files == before.files
    c.check_digest(after.digest, after.digest, tmp_path)
    with pytest.raises(IntraFusionError, match="not the one the model was trained on"):
        c.check_digest(before.digest, after.digest, tmp_path)


def test_read_source_normalises_newlines_and_replaces_bad_bytes(tmp_path):
    (tmp_path / "m.py").write_bytes(b"a = 1\r\nb = '\xff'\rc = 3\n")
    assert c.read_source(tmp_path, "m.py") == "a = 1\nb = '\ufffd'\nc = 3\n"


def test_tokenizer_is_deterministic_and_round_trips_text(tmp_path):
    write_fake_corpus(tmp_path)
    texts = c.load_corpus(tmp_path).texts("train")
    tokenizer = c.train_tokenizer(texts, vocab_size=320)
    assert tokenizer.to_str() == c.train_tokenizer(texts, vocab_size=320).to_str()
    assert 257 < tokenizer.get_vocab_size() <= 320
    sample = "def f(x):\n\treturn 'héllo ∑ 🐍'  # never seen\n"
    ids = tokenizer.encode(sample).ids
    assert tokenizer.decode(ids) == sample
    assert len(tokenizer.encode(texts[0]).ids) < len(texts[0].encode())  # merges were learnt
    again = c.tokenizer_from_json(tokenizer.to_str(), "x")
    assert again.encode(sample).ids == ids
    with pytest.raises(IntraFusionError, match="not a tokenizer.json"):
        c.tokenizer_from_json("{not json", "bad.json")


def test_encode_ends_every_text_with_the_end_of_text_token(tmp_path):
    write_fake_corpus(tmp_path)
    tokenizer = c.train_tokenizer(c.load_corpus(tmp_path).texts("train"), vocab_size=300)
    end = tokenizer.token_to_id(c.END_OF_TEXT)
    texts = ["x = 1\n", "def f():\n    pass\n"]
    tokens = c.encode(tokenizer, texts)
    lengths = [len(tokenizer.encode(t).ids) for t in texts]
    assert tokens.dtype == torch.long and len(tokens) == sum(lengths) + 2
    assert tokens[lengths[0]] == end and tokens[-1] == end
    assert int((tokens == end).sum()) == 2


def test_random_windows_are_seeded_slices_of_the_tokens():
    tokens = torch.arange(100) * 3
    windows = c.random_windows(tokens, 5, 8, torch.Generator().manual_seed(1))
    assert windows.shape == (5, 9)
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.full((5, 8), 3))
    assert torch.equal(windows, c.random_windows(tokens, 5, 8, torch.Generator().manual_seed(1)))
    with pytest.raises(IntraFusionError, match="fewer than one window"):
        c.random_windows(tokens[:8], 1, 8, torch.Generator())


@pytest.mark.parametrize("n", [0, 1, 2, 9, 17, 23])
def test_eval_windows_make_every_token_after_the_first_a_target_once(n):
    tokens = torch.arange(n) + 10
    windows = c.eval_windows(tokens, 8)
    assert all(w.dim() == 2 and 2 <= w.shape[1] <= 9 for w in windows)
    assert [w.shape for w in windows[:1]] == ([((n - 1) // 8, 9)] if n > 8 else
                                              [(1, n)] if n >= 2 else [])
    targets = torch.cat([w[:, 1:].reshape(-1) for w in windows]) if windows else torch.tensor([])
    assert targets.tolist() == tokens[1:].tolist()
    for w in windows:   # each window is a contiguous run of the split
        assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones_like(w[:, 1:]))
