"""Training from scratch, resumable after every epoch: Nesterov SGD with a one-cycle schedule
(`optimizer="sgd"`, the CNNs), or AdamW with a linear warm-up then a cosine decay to 0
(`optimizer="adamw"`, the transformers: SGD leaves a small ViT undertrained).

The resume state (model, optimizer, scheduler, RNG, finished epochs) is written atomically to
`<checkpoint>.state` after each epoch (and every `save_every` steps), so an interrupted run
continues where it stopped; the final checkpoint has the authors' format
`{"model_state_dict", "test_accuracy", "epoch"}` plus `"settings"`. `test_accuracy` is a
percentage, as in the authors' checkpoints. With `held_out` > 0 that many training images (a
seeded draw) are left out of training and measured instead of the test set (`held_out_accuracy`),
to choose hyper-parameters without looking at the test set.

`finetune` fine-tunes a pruned (BN-folded) network to measure how fast it recovers: SGD with
momentum 0.9 and weight decay 5e-4, a cosine schedule from `lr` to 0, the same augmentation, and
every BatchNorm kept in eval mode — their statistics were folded into the layer before (they are
identities), and batch statistics would replace that folded function by a different one. With no
normalization left, a pruned network whose activations grow layer after layer (Intra-Fusion's
`fork` rule over every group: a loss of ~50 and gradient norms of ~450 on VGG11-BN at sparsity 0.5)
diverges at the first steps, so fine-tuning clips the gradient norm (`max_grad_norm`).
"""
from __future__ import annotations

import dataclasses
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .checkpoints import load_weights
from .data import Dataset, train_batches
from ..errors import IntraFusionError
from ..evaluation import accuracy
from ..models import build_model
from ..storage import atomic_write, check_writable, load_tensors


OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainSettings:
    model_name: str
    dataset: str
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0
    optimizer: str = "sgd"       # one of OPTIMIZERS
    warmup_epochs: float = 0.0   # AdamW's linear warm-up (SGD's one-cycle schedule has its own)
    held_out: int = 0            # training images measured instead of the test set (0: none)

    def __post_init__(self):
        """Refuse settings that cannot train (named by their train.py flags)."""
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--lr", self.lr)):
            if not (math.isfinite(value) and value > 0):
                raise IntraFusionError(f"--epochs, --batch-size and --lr must be positive, got {flag} {value}")
        if not 0 < self.momentum < 1:
            raise IntraFusionError(f"--momentum must lie in (0, 1) (SGD's momentum, AdamW's beta1), "
                                   f"got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise IntraFusionError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed < 2 ** 63:
            raise IntraFusionError(f"--seed must lie in [0, 2**63), got {self.seed}")
        if self.optimizer not in OPTIMIZERS:
            raise IntraFusionError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs):
            raise IntraFusionError(f"--warmup-epochs must lie in [0, --epochs), got {self.warmup_epochs}")
        if self.optimizer == "sgd" and self.warmup_epochs:
            raise IntraFusionError("--warmup-epochs is for --optimizer adamw (SGD's one-cycle "
                                   "schedule warms up by itself)")
        if self.held_out < 0:
            raise IntraFusionError(f"--held-out must be >= 0, got {self.held_out}")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning rate at `step` (0-based, of `total`) as a fraction of the peak: a linear
    warm-up to 1 over the first `warmup` steps, then a cosine decay that reaches 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, settings: TrainSettings, steps_per_epoch: int):
    """(optimizer, per-step scheduler) of `settings` for `model`: Nesterov SGD with a one-cycle
    schedule, or AdamW (betas (momentum, 0.999); weight decay on the weights of linear and
    convolution layers only, not on biases, norms, embeddings or the class token) with
    warmup_cosine, its warm-up `warmup_epochs` epochs long."""
    total = settings.epochs * steps_per_epoch
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay, nesterov=True)
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total)
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if id(p) in decayed], "weight_decay": settings.weight_decay},
         {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.momentum, 0.999))
    warmup = round(settings.warmup_epochs * steps_per_epoch)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total))


def split_held_out(dataset: Dataset, count: int, seed: int = 0) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """(`dataset` without `count` training images of a seeded permutation, those images
    normalized (count, 3, 32, 32), their labels (count,)); IntraFusionError if too many."""
    n = len(dataset.train_labels)
    if count >= n:
        raise IntraFusionError(f"--held-out must be below the {n} training images, got {count}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:count], order[count:].sort().values
    rest = dataclasses.replace(dataset, train_images=dataset.train_images[kept],
                               train_labels=dataset.train_labels[kept])
    return rest, dataset.normalize(dataset.train_images[held]), dataset.train_labels[held]


def new_model(settings: TrainSettings, num_classes: int) -> nn.Module:
    """The untrained model of `settings`, its initial weights drawn from `settings.seed`; a ResNet
    gets the authors' layout (conv biases), so its checkpoint is interchangeable with theirs."""
    torch.manual_seed(settings.seed)
    return build_model(settings.model_name, num_classes)


def atomic_save(obj, path: Path) -> None:
    """torch.save `obj` atomically to `path` (storage.atomic_write)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue(), "rerun the same command to resume")


_STATE_KEYS = {"settings", "model", "optimizer", "scheduler", "generator", "epoch", "step", "history"}


def read_state(path: Path) -> dict:
    """The resume state at `path` (loaded with weights_only=True); IntraFusionError if unusable."""
    hint = "delete it to start training over"
    state = load_tensors(path, hint)
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        raise IntraFusionError(f"{path} is not a training state of train.py; {hint}")
    return state


def sgd_step(model: nn.Module, loss_fn, optimizer, scheduler, x: torch.Tensor, y: torch.Tensor,
             device: torch.device, max_grad_norm: float | None = None) -> float:
    """One optimizer and scheduler step on batch (x, y), the gradient's norm clipped to
    `max_grad_norm` if given; the batch's mean loss."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def train(model: nn.Module, dataset: Dataset, settings: TrainSettings, checkpoint: Path,
          device: torch.device = torch.device("cpu"), save_every: int = 100,
          quiet: bool = False) -> dict:
    """Train `model` on `dataset`, resuming from `<checkpoint>.state` if present; return the
    final checkpoint dict (also written to `checkpoint`), its accuracy under "test_accuracy", or
    "held_out_accuracy" when settings.held_out > 0."""
    checkpoint = Path(checkpoint)
    state_path = checkpoint.with_name(checkpoint.name + ".state")
    check_writable(checkpoint)
    torch.manual_seed(settings.seed)
    model.to(device, memory_format=torch.channels_last)  # ~15% faster convolutions on CPU
    if settings.held_out:
        dataset, eval_x, eval_y = split_held_out(dataset, settings.held_out)
    else:
        eval_x, eval_y = dataset.test_tensors()
    metric = "held_out_accuracy" if settings.held_out else "test_accuracy"
    steps_per_epoch = -(-len(dataset.train_labels) // settings.batch_size)
    optimizer, scheduler = make_optimizer(model, settings, steps_per_epoch)
    generator = torch.Generator().manual_seed(settings.seed)
    epoch, step_in_epoch, history = 0, 0, []
    if state_path.is_file():
        state = read_state(state_path)
        if state["settings"] != dataclasses.asdict(settings):
            raise IntraFusionError(f"{state_path} was written with other training settings; delete it "
                            "or train with the same settings to resume")
        load_weights(model, state["model"], state_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        epoch, step_in_epoch, history = state["epoch"], state["step"], state["history"]
    loss_fn = nn.CrossEntropyLoss()

    def save_state(epoch_generator_state):
        atomic_save({"settings": dataclasses.asdict(settings), "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "generator": epoch_generator_state, "epoch": epoch, "step": step_in_epoch,
                     "history": history}, state_path)

    while epoch < settings.epochs:
        start = time.time()
        epoch_state = generator.get_state()  # the epoch's shuffle is replayed on resume
        model.train()
        batches = train_batches(dataset, settings.batch_size, generator, settings.augment)
        total_loss, seen = 0.0, 0
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, disable=quiet, leave=False,
                   desc=f"epoch {epoch + 1}/{settings.epochs}")
        for i, (x, y) in enumerate(batches):
            if i < step_in_epoch:
                continue
            total_loss += sgd_step(model, loss_fn, optimizer, scheduler, x, y, device) * len(y)
            seen += len(y)
            step_in_epoch = i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}")
            if save_every and step_in_epoch % save_every == 0 and step_in_epoch < steps_per_epoch:
                save_state(epoch_state)
        bar.close()
        acc = accuracy(model, eval_x, eval_y)
        history.append({"epoch": epoch + 1, "loss": total_loss / max(seen, 1),
                        metric: 100 * acc, "seconds": time.time() - start})
        epoch, step_in_epoch = epoch + 1, 0
        save_state(generator.get_state())
        line = (f"epoch {epoch}/{settings.epochs}  loss {history[-1]['loss']:.4f}  "
                f"{metric.replace('_', ' ')} {100 * acc:.2f}%  {history[-1]['seconds']:.0f}s")
        tqdm.write(line) if not quiet else print(line, flush=True)
    model.to(memory_format=torch.contiguous_format)
    result = {"model_state_dict": model.state_dict(), metric: history[-1][metric],
              "epoch": settings.epochs, "settings": dataclasses.asdict(settings),
              "history": history}
    atomic_save(result, checkpoint)
    return result


def train_mode_with_frozen_batchnorms(model: nn.Module) -> None:
    """model.train(), except that every BatchNorm stays in eval mode (running statistics used
    and left unchanged)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finetune(model: nn.Module, dataset: Dataset, epochs: int, lr: float, batch_size: int = 128,
             device: torch.device = torch.device("cpu"), seed: int = 0,
             on_epoch: Callable[[int, nn.Module], None] | None = None,
             max_batches: int | None = None, max_grad_norm: float | None = 5.0) -> list[dict]:
    """Fine-tune `model` in place on the training set for `epochs` epochs (at most `max_batches`
    batches each, gradient norms clipped to `max_grad_norm`, None = no clipping); call
    on_epoch(epoch, model) after each epoch (1-based, model in eval mode) and return one
    {"epoch", "loss", "seconds"} per epoch. The model is left in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = -(-len(dataset.train_labels) // batch_size)
    steps = min(steps, max_batches) if max_batches is not None else steps
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, epochs + 1):
        start, total, seen = time.time(), 0.0, 0
        train_mode_with_frozen_batchnorms(model)
        model.to(memory_format=torch.channels_last)
        for i, (x, y) in enumerate(train_batches(dataset, batch_size, generator)):
            if i == steps:
                break
            total += sgd_step(model, loss_fn, optimizer, scheduler, x, y, device,
                              max_grad_norm) * len(y)
            seen += len(y)
        model.eval().to(memory_format=torch.contiguous_format)
        history.append({"epoch": epoch, "loss": total / max(seen, 1), "seconds": time.time() - start})
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return history
