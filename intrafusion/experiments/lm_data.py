"""What the compress, evaluate and grid commands need for a language model: the trained model of
a folder, the `python-stdlib` token windows each step uses, the costs a budget counts, and the test
perplexity of many pruned copies in one data-major pass.

Data: calibration windows (repair, reconstruction, taylor) are random windows of the train split
drawn with seed 1, in batches of CALIBRATION_WINDOWS windows of the model's context; the held-out
windows of the sensitivity allocation are windows of the held-out split, spread evenly over it;
the test split gives the reported perplexity and nothing else. Perplexity is exp(mean next-token
NLL) over every token of the split after its first, as lm_training.split_perplexity measures it
(corpus.eval_windows: full windows and a shorter tail window).

Costs (`lm_costs`): the decoder blocks' parameters and MACs (decoder.lm_cost_model: every matrix
product of the blocks for one window of `context` tokens), what the budgets count, and the whole
model's: parameters counted once where tied (embeddings and LM head), MACs the blocks' plus the LM
head's (embedding look-ups and the final norm count none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import corpus as corpus_lib
from .checkpoints import ensure_unzipped
from .lm_training import load_language_model
from ..decoder import decoder_groups, group_slots, lm_cost_model
from ..errors import IntraFusionError
from ..evaluation import scored_count
from ..evaluator import GridEvaluator
from ..models import LANGUAGE_MODEL_NAMES
from ..storage import file_digest

LANGUAGE_DATASETS = (corpus_lib.DATASET,)
CALIBRATION_WINDOWS = 4   # windows per calibration batch (--calibration-batches 16: 64 windows)
EVAL_BATCH = 16           # windows per evaluation batch (logits: 16 × 257 × 4096 floats, 67 MB)
FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "metrics.json")


def is_language_model(model_name: str) -> bool:
    return model_name in LANGUAGE_MODEL_NAMES


def check_pairing(model_name: str, dataset: str) -> None:
    """IntraFusionError unless a language model goes with a text corpus and an image model with
    an image dataset."""
    if is_language_model(model_name) and dataset not in LANGUAGE_DATASETS:
        raise IntraFusionError(f"{model_name} is a language model: --dataset must be "
                               f"{' or '.join(LANGUAGE_DATASETS)}, not {dataset!r}")
    if dataset in LANGUAGE_DATASETS and not is_language_model(model_name):
        raise IntraFusionError(f"{dataset} is a text corpus for language models "
                               f"({', '.join(LANGUAGE_MODEL_NAMES)}), not for {model_name!r}")


def default_folder(model_name: str) -> Path:
    """Where train_lm.py writes the model: models/python-stdlib/<name>/."""
    return Path("models") / corpus_lib.DATASET / model_name


@dataclass
class LanguageModelInputs:
    """A trained language model (eval mode), its tokenizer and metrics.json, the sha256 of its
    weights, its context (tokens per window) and the corpus it was trained on (digest checked)."""

    folder: Path
    model: nn.Module
    tokenizer: object
    metrics: dict
    digest: str
    context: int
    corpus: corpus_lib.Corpus

    def tokens(self, split: str) -> torch.Tensor:
        """(N,) int64: the split's token ids (corpus.encode)."""
        return corpus_lib.encode(self.tokenizer, self.corpus.texts(split))


def open_folder(folder: Path, corpus_root: Path | None = None) -> LanguageModelInputs:
    """The language model in `folder` (train_lm.py's, or one `compress` wrote) and the corpus at
    `corpus_root` (default this Python's standard library), refused unless it is the corpus the
    model was trained on."""
    folder = Path(folder)
    model, tokenizer, metrics = load_language_model(folder)
    corpus = corpus_lib.load_corpus(corpus_root)
    corpus_lib.check_digest(str(metrics.get("corpus_digest")), corpus.digest, corpus.root)
    weights = next(folder / n for n in ("model.safetensors", "model.pt") if (folder / n).is_file())
    return LanguageModelInputs(folder, model, tokenizer, metrics, file_digest(weights),
                               int(model.config.max_position_embeddings), corpus)


def open_language_model(model_name: str, checkpoint: Path | None = None,
                        corpus_root: Path | None = None) -> LanguageModelInputs:
    """The model `model_name` trained into `checkpoint` (default default_folder; unzipped from
    models.zip on first use), with its corpus (open_folder)."""
    folder = Path(checkpoint) if checkpoint is not None else default_folder(model_name)
    for name in FOLDER_FILES:
        ensure_unzipped(folder / name)
    lm = open_folder(folder, corpus_root)
    if lm.metrics.get("model") != model_name:
        raise IntraFusionError(f"{folder} holds a {lm.metrics.get('model')!r} model, not {model_name!r}")
    return lm


def calibration_windows(tokens: torch.Tensor, batches: int, context: int, seed: int = 1) -> list[torch.Tensor]:
    """`batches` batches (CALIBRATION_WINDOWS, context) of random windows of `tokens` (N,)
    (corpus.random_windows from a generator seeded with `seed`)."""
    if batches < 1:
        return []
    generator = torch.Generator().manual_seed(seed)
    windows = corpus_lib.random_windows(tokens, batches * CALIBRATION_WINDOWS, context - 1, generator)
    return list(windows.split(CALIBRATION_WINDOWS))


def held_out_windows(tokens: torch.Tensor, count: int, context: int) -> torch.Tensor:
    """(min(count, W), context + 1): full windows of corpus.eval_windows(tokens, context), spread
    evenly over the split (all W of them when count >= W)."""
    windows = corpus_lib.eval_windows(tokens, context)
    if not windows or windows[0].shape[1] != context + 1:
        raise IntraFusionError(f"the held-out split has {len(tokens)} tokens, fewer than one window of "
                               f"{context + 1}")
    full = windows[0]
    if count >= len(full):
        return full
    return full[torch.linspace(0, len(full) - 1, count).round().long()]


def lm_costs(model: nn.Module, context: int) -> dict[str, int]:
    """{"params", "macs", "block_params", "block_macs"} of a causal LM (module docstring), MACs
    for one window of `context` tokens."""
    example = {"input_ids": torch.zeros(1, context, dtype=torch.long)}
    costs = lm_cost_model(model, decoder_groups(model), example)
    head = model.get_output_embeddings()
    blocks = {"block_params": round(costs.base("params")), "block_macs": round(costs.base("macs"))}
    unique = {id(p): p.numel() for p in model.parameters()}
    return {"params": sum(unique.values()), "macs": blocks["block_macs"] + context * head.weight.numel(),
            **blocks}


def unit_widths(model: nn.Module) -> list[int]:
    """The units (MLP neurons, KV groups) of each group of a causal LM, in group order."""
    return [len(group_slots(model, g)[0].index) for g in decoder_groups(model)]


class PerplexityEvaluator:
    """Test perplexity of a causal LM `model` and of pruned copies of it, over windows (each
    (W, T) of corpus.eval_windows: full windows and a tail), with the data-major GridEvaluator:
    one pass per window shape for all pending variants, the unpruned model's perplexity from the
    first. fast=False: each variant and the unpruned model in passes of their own (the naive
    path, bench/lm_grid_speed.py)."""

    def __init__(self, model: nn.Module, windows: list[torch.Tensor], fast: bool = True,
                 batch_size: int = EVAL_BATCH):
        if not windows:
            raise IntraFusionError("no evaluation window: the split has fewer than two tokens")
        self.parts = [GridEvaluator(SimpleNamespace(model=model), w, w, fast, batch_size) for w in windows]
        self.counts = [scored_count(w) for w in windows]

    @property
    def tokens(self) -> int:
        """The number of next tokens scored."""
        return sum(self.counts)

    def _combine(self, losses) -> float:
        return math.exp(sum(n * loss for n, loss in zip(self.counts, losses)) / self.tokens)

    def perplexities(self, models: list[nn.Module]) -> list[float]:
        """The perplexity of each pruned copy, in order."""
        variants = [SimpleNamespace(model=m) for m in models]
        per_part = [part.evaluate(variants, "cross_entropy") for part in self.parts]
        return [self._combine(losses) for losses in zip(*per_part)]

    def unpruned(self) -> float:
        """The unpruned model's perplexity (from the first pass, or a pass of its own)."""
        return self._combine([part.unpruned("cross_entropy") for part in self.parts])

    @property
    def stats(self) -> dict[str, int]:
        """GridEvaluator.stats summed over the window shapes."""
        return {k: sum(p.stats[k] for p in self.parts) for k in self.parts[0].stats}
