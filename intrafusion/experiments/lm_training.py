"""Training the shipped language model on the `python-stdlib` corpus, resumable, and measuring
its perplexity.

Schedule: AdamW (betas 0.9/0.95, weight decay on matrices only), a linear warm-up over
`warmup_steps`, then a cosine decay to `min_lr_ratio * lr` at `steps`, a total fixed up front so a
resumed run follows the same schedule; gradient norms clipped to `max_grad_norm`. Batches are
random windows of the train split drawn from one seeded generator.

Resume state (settings, model, optimizer, scheduler, generator, step, history, the tokenizer and
the corpus digest) is written atomically to `<out>.state` every `save_seconds` and at the end, as
train.py's trainer does (training.atomic_save); the same command resumes, refusing a state
written with other settings or on another corpus. The tokenizer is trained on the train split at
the first start and kept in the state, so a resumed run encodes with the same one.

At the end, `<out>/` holds the shipped model: config.json and model.safetensors
(save_pretrained), tokenizer.json, and metrics.json (written last: its presence means the
folder is complete) with the perplexity of the whole held-out and test splits.

Perplexity is exp(mean next-token negative log-likelihood) over every token of a split after its
first (`split_perplexity`; windows overlap by one token, so no token is a target twice).
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import corpus as corpus_lib
from .training import atomic_save, sgd_step
from ..errors import IntraFusionError
from ..models.lm import llama_gqa, load_llama
from ..storage import atomic_write, check_writable, load_tensors

DEFAULT_OUT = Path("models") / corpus_lib.DATASET / "llama_gqa"


@dataclass(frozen=True)
class LMSettings:
    """Model size and training schedule; the defaults are the shipped model's (train_lm.py's
    defaults): 4.9 M training tokens (1.7 passes over the train split), 25 minutes on one thread
    of 2 busy shared cores."""
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = corpus_lib.VOCAB_SIZE
    context: int = 256
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    warmup_steps: int = 60
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        """Refuse settings that cannot train (named by their train_lm.py flags)."""
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--context", self.context), ("--lr", self.lr)):
            if not (math.isfinite(value) and value > 0):
                raise IntraFusionError(f"{flag} must be positive, got {value}")
        if not 0 <= self.warmup_steps < self.steps:
            raise IntraFusionError(f"--warmup-steps must lie in [0, --steps), got {self.warmup_steps}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise IntraFusionError("the hidden size must be a multiple of the query heads, and "
                                   "those a multiple of the key/value heads")
        if not 0 <= self.seed < 2 ** 63:
            raise IntraFusionError(f"--seed must lie in [0, 2**63), got {self.seed}")

    def model_kwargs(self) -> dict:
        """The keyword arguments of models.lm.llama_gqa that these settings fix."""
        return {k: getattr(self, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "intermediate_size")}


def lr_factor(step: int, settings: LMSettings) -> float:
    """The learning rate at `step` (0-based) as a fraction of settings.lr: linear warm-up, then
    cosine decay to settings.min_lr_ratio at settings.steps."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(settings.steps - settings.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine


def next_token_loss(output, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a causal LM's output (its .logits (B, L, V)) against targets (B, L)."""
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of targets) of windows (B, T): every
    windows[:, t + 1] predicted from windows[:, :t + 1]."""
    return float(next_token_loss(model(windows[:, :-1]), windows[:, 1:], "sum")), windows[:, 1:].numel()


@torch.no_grad()
def split_perplexity(model: nn.Module, tokens: torch.Tensor, context: int, batch_size: int = 32,
                     max_windows: int | None = None) -> float:
    """exp(mean next-token NLL) of `model` over `tokens` (N,) cut into corpus.eval_windows of
    `context` (the first `max_windows` full windows only, if given). Leaves the model in eval mode."""
    model.eval()
    total, count = 0.0, 0
    windows = corpus_lib.eval_windows(tokens, context)
    if max_windows is not None:
        windows = [windows[0][:max_windows]] if windows else []
    for group in windows:
        for start in range(0, len(group), batch_size):
            nll, n = window_nll(model, group[start:start + batch_size])
            total, count = total + nll, count + n
    if count == 0:
        raise IntraFusionError("cannot measure perplexity on fewer than two tokens")
    return math.exp(total / count)


def _optimizer(model: nn.Module, settings: LMSettings) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only (not on norms' gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=settings.lr, betas=(0.9, 0.95))


_STATE_KEYS = {"settings", "model", "optimizer", "scheduler", "generator", "step", "history",
               "tokenizer", "digest", "seconds"}


def _read_state(path: Path, settings: LMSettings, digest: str, corpus_root: Path) -> dict:
    hint = "delete it to start training over"
    state = load_tensors(path, hint)
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        raise IntraFusionError(f"{path} is not a training state of train_lm.py; {hint}")
    if state["settings"] != dataclasses.asdict(settings):
        raise IntraFusionError(f"{path} was written with other training settings; {hint} or "
                               "train with the same settings to resume")
    corpus_lib.check_digest(state["digest"], digest, corpus_root)
    return state


def train_language_model(settings: LMSettings, out: Path = DEFAULT_OUT, corpus_root: Path | None = None,
                         command: str = "", log_every: int = 50, eval_every: int = 250,
                         eval_windows: int = 64, save_seconds: float = 180.0,
                         stop_after: int | None = None, log=print) -> dict | None:
    """Train the shipped model on the corpus at `corpus_root` (default: this Python's standard
    library) as the module docstring says, resuming from `<out>.state` if present.

    Every `log_every` steps logs the mean training loss; every `eval_every` steps the perplexity
    of the first `eval_windows` held-out windows. With `stop_after`, returns None after that many
    steps of this call (state saved) unless training ends first; else writes `<out>/` and returns
    its metrics."""
    out = Path(out)
    state_path = out.with_name(out.name + ".state")
    check_writable(out / "metrics.json")
    corpus = corpus_lib.load_corpus(corpus_root)
    state = _read_state(state_path, settings, corpus.digest, corpus.root) if state_path.is_file() else None
    tokenizer = (corpus_lib.tokenizer_from_json(state["tokenizer"], state_path) if state else
                 corpus_lib.train_tokenizer(corpus.texts("train"), settings.vocab_size))
    train_tokens = corpus_lib.encode(tokenizer, corpus.texts("train"))
    heldout_tokens = corpus_lib.encode(tokenizer, corpus.texts("heldout"))
    end = tokenizer.token_to_id(corpus_lib.END_OF_TEXT)
    torch.manual_seed(settings.seed)
    model = llama_gqa(tokenizer.get_vocab_size(), settings.context, bos_token_id=end,
                      eos_token_id=end, **settings.model_kwargs())
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    generator = torch.Generator().manual_seed(settings.seed)
    step, history, seconds = 0, [], 0.0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        step, history, seconds = state["step"], state["history"], state["seconds"]
        log(f"resumed at step {step}/{settings.steps} from {state_path}")
    log(f"{sum(p.numel() for p in model.parameters()):,} parameters; train {len(train_tokens):,} "
        f"tokens, held-out {len(heldout_tokens):,}; corpus digest {corpus.digest[:12]}")

    def save_state():
        atomic_save({"settings": dataclasses.asdict(settings), "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "generator": generator.get_state(), "step": step, "history": history,
                     "tokenizer": tokenizer.to_str(), "digest": corpus.digest,
                     "seconds": elapsed()}, state_path)

    def elapsed():
        return seconds + time.time() - started

    started, last_save, window_loss, window_steps = time.time(), time.time(), 0.0, 0
    steps_this_call = 0
    while step < settings.steps:
        if stop_after is not None and steps_this_call == stop_after:
            save_state()
            return None
        model.train()
        batch = corpus_lib.random_windows(train_tokens, settings.batch_size, settings.context, generator)
        window_loss += sgd_step(model, next_token_loss, optimizer, scheduler, batch[:, :-1],
                                batch[:, 1:], torch.device("cpu"), settings.max_grad_norm)
        window_steps += 1
        step, steps_this_call = step + 1, steps_this_call + 1
        if step % log_every == 0 or step == settings.steps:
            tokens = step * settings.batch_size * settings.context
            log(f"step {step}/{settings.steps}  loss {window_loss / window_steps:.4f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {tokens / elapsed():,.0f} tokens/s  {elapsed():.0f}s")
            history.append({"step": step, "loss": window_loss / window_steps})
            window_loss, window_steps = 0.0, 0
        if step % eval_every == 0 and step < settings.steps:
            ppl = split_perplexity(model, heldout_tokens, settings.context, max_windows=eval_windows)
            history.append({"step": step, "heldout_subset_perplexity": ppl})
            log(f"step {step}  held-out perplexity (first {eval_windows} windows) {ppl:.3f}")
        if time.time() - last_save >= save_seconds:
            save_state()
            last_save = time.time()
    save_state()
    return _finish(model, tokenizer, corpus, settings, out, history, elapsed(), command, log)


def _finish(model, tokenizer, corpus, settings: LMSettings, out: Path, history: list, seconds: float,
            command: str, log) -> dict:
    """Measure the whole held-out and test splits and write the shipped model to `out`/."""
    ppl = {split: split_perplexity(model, corpus_lib.encode(tokenizer, corpus.texts(split)), settings.context)
           for split in ("heldout", "test")}
    metrics = {
        "dataset": corpus_lib.DATASET, "model": "llama_gqa",
        "heldout_perplexity": ppl["heldout"], "test_perplexity": ppl["test"],
        "steps": settings.steps, "tokens_trained": settings.steps * settings.batch_size * settings.context,
        "training_seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
        "settings": dataclasses.asdict(settings), "command": command,
        "corpus_digest": corpus.digest, "corpus_files": {s: len(corpus.files[s]) for s in corpus.files},
        "python": platform.python_version(), "history": history,
    }
    model.save_pretrained(out, safe_serialization=True)
    atomic_write(out / "tokenizer.json", tokenizer.to_str().encode(), "rerun the same command")
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=1).encode(), "rerun the same command")
    log(f"held-out perplexity {ppl['heldout']:.3f}  test perplexity {ppl['test']:.3f}  -> {out}")
    return metrics


def load_pruned_llama(folder: Path) -> nn.Module:
    """A compressed `LlamaForCausalLM` whose layers differ in width, saved in `folder` as
    config.json (the widths every layer shares) and model.pt (intrafusion.save; read without
    running code from it), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from ..serialize import load
    try:
        model = LlamaForCausalLM(LlamaConfig.from_json_file(Path(folder) / "config.json"))
    except Exception as exc:  # a malformed config fails in many ways (JSONDecodeError, TypeError, ...)
        raise IntraFusionError(f"{folder}/config.json is not a Llama config ({type(exc).__name__}); "
                               "compress the model again") from None
    return load(Path(folder) / "model.pt", model=model).eval()


def load_language_model(folder: Path = DEFAULT_OUT):
    """(model in eval mode, tokenizer, metrics dict) of a folder written by train_language_model;
    the weights are read from model.safetensors (no code from the folder runs), or from model.pt
    (intrafusion.save) in a folder of `intrafusion compress` whose layers differ in width."""
    folder = Path(folder)
    pruned = (folder / "model.pt").is_file() and not (folder / "model.safetensors").is_file()
    missing = [n for n in ("config.json", "model.pt" if pruned else "model.safetensors", "tokenizer.json",
                           "metrics.json")
               if not (folder / n).is_file()]
    if missing:
        raise IntraFusionError(f"{folder} is not a trained language model (no {', '.join(missing)}); "
                               "train one with train_lm.py or unzip models.zip")
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntraFusionError(f"{folder / 'metrics.json'} is not valid JSON; retrain or unzip models.zip") from None
    if not isinstance(metrics, dict) or metrics.get("dataset") != corpus_lib.DATASET:
        raise IntraFusionError(f"{folder / 'metrics.json'} does not describe a {corpus_lib.DATASET} model")
    tokenizer = corpus_lib.tokenizer_from_json((folder / "tokenizer.json").read_text(), folder / "tokenizer.json")
    return (load_pruned_llama(folder) if pruned else load_llama(folder)), tokenizer, metrics


def split_tokens(tokenizer, split: str, corpus_root: Path | None = None,
                 digest: str | None = None) -> torch.Tensor:
    """(N,) int64: one split of the corpus at `corpus_root` (default: this Python's standard
    library) encoded with `tokenizer`; IntraFusionError if `digest` is given and the corpus is
    not that one (pass a model's metrics["corpus_digest"])."""
    corpus = corpus_lib.load_corpus(corpus_root)
    if digest is not None:
        corpus_lib.check_digest(digest, corpus.digest, corpus.root)
    return corpus_lib.encode(tokenizer, corpus.texts(split))
