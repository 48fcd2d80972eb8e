"""A user's own plain training loop on a network from `intrafusion.compress`, against RESULTS.md.

    python bench/plain_finetune.py [--methods intra_fusion_repair default ...] [--epochs 1]

Compresses the shipped VGG11-BN Fashion-MNIST checkpoint (every group at sparsity 0.5, l1, fork;
calibration: 10 batches of 128 training images, the grid's repair data) and fine-tunes it with
nothing the library provides: model.train() (BatchNorms normalize with batch statistics), SGD
(learning rate 0.01, cosine to 0, momentum 0.9, weight decay 5e-4, the training augmentation,
batch 128), no gradient clipping. Prints, per method, the whole Fashion-MNIST test set's accuracy
before and after, next to `main.py --finetune-epochs 1`'s row of RESULTS.md's fine-tuning table
(BatchNorm folded and frozen, gradient norm clipped at 5).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import intrafusion  # noqa: E402
from intrafusion.evaluation import accuracy  # noqa: E402
from intrafusion.experiments.checkpoints import ensure_unzipped, load_weights, read_checkpoint  # noqa: E402
from intrafusion.experiments.data import load_dataset, train_batches  # noqa: E402
from intrafusion.experiments.grid import calibration_batches  # noqa: E402
from intrafusion.models import build_model  # noqa: E402

CHECKPOINT = Path("models/fashion-mnist/vgg11_bn.checkpoint")
# RESULTS.md, "Fine-tuning recovery", vgg11_bn at 0.5: (before, after 1 epoch) in percent
RESULTS = {"default": (10.00, 89.12), "intra_fusion": (35.91, 91.39), "default_repair": (34.18, 91.05),
           "intra_fusion_repair": (78.22, 91.42), "intra_fusion_varfix": (65.27, 91.56)}


def plain_finetune(model: nn.Module, dataset, epochs: int, lr: float = 0.01, seed: int = 0) -> float:
    """What a user writes: train mode, SGD with momentum, cosine schedule, no clipping; the
    last epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(dataset.train_labels) // 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train().to(memory_format=torch.channels_last)
    for _ in range(epochs):
        total, seen = 0.0, 0
        for x, y in train_batches(dataset, 128, generator):
            loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
    model.eval().to(memory_format=torch.contiguous_format)
    return total / seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(RESULTS), choices=list(RESULTS))
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    ensure_unzipped(CHECKPOINT)
    dataset = load_dataset("fashion-mnist", "data")
    model = build_model("vgg11_bn", dataset.num_classes)
    load_weights(model, read_checkpoint(CHECKPOINT)["model_state_dict"], CHECKPOINT)
    test_x, test_y = dataset.test_tensors()
    calibration = calibration_batches(dataset, 10, 128, seed=1)
    print(f"vgg11_bn unpruned: {100 * accuracy(model.eval(), test_x, test_y):.2f}% on "
          f"{len(test_y)} test images", flush=True)
    print("| method | before (RESULTS / measured) | after 1 epoch: RESULTS --finetune-epochs 1 | "
          "plain loop, train() | loss | seconds |\n|---|---|---|---|---|---|", flush=True)
    for method in args.methods:
        start = time.time()
        small = intrafusion.compress(model, test_x[:1], sparsity=0.5, method=method,
                                     calibration=calibration)
        before = 100 * accuracy(small, test_x, test_y)
        loss = plain_finetune(small, dataset, args.epochs)
        after = 100 * accuracy(small, test_x, test_y)
        ref_before, ref_after = RESULTS[method]
        print(f"| {method} | {ref_before:.2f} / {before:.2f} | {ref_after:.2f} | {after:.2f} | "
              f"{loss:.4f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
