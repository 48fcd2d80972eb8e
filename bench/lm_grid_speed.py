"""The language model's grid evaluation: data-major (as main.py evaluates a chunk of cells) against
a naive loop; CPU and wall seconds, their ratio, and the largest difference in perplexity.

    python bench/lm_grid_speed.py [--checkpoint models/python-stdlib/llama_gqa] [--windows N]
        [--group_idxs 0 1 ...] [--sparsities 0.25 0.5] [--methods default intra_fusion]
        [--threads N] [--record results/lm_grid_speed.json]

The cells' variants are pruned once (intrafusion.compress, as lm_grid.py does; not timed), then
their test perplexities are measured twice in this process: data-major (lm_data.PerplexityEvaluator:
per batch of windows the unpruned model runs once, to its end, keeping the activations entering
each variant's first changed decoder layer, and every variant runs from there; the unpruned
perplexity comes from the same pass), and naive (each variant's whole forward pass, and the
unpruned model's, each in passes of their own). `--windows N` uses the first N full test windows
(plus nothing else) to keep the naive path short.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import intrafusion  # noqa: E402
from intrafusion.evaluator import share_unchanged  # noqa: E402
from intrafusion.experiments import corpus as corpus_lib  # noqa: E402
from intrafusion.experiments.allocator import release_large_buffers  # noqa: E402
from intrafusion.experiments.lm_data import (PerplexityEvaluator, calibration_windows,  # noqa: E402
                                             open_language_model)
from intrafusion.storage import atomic_write  # noqa: E402


def timed(evaluator: PerplexityEvaluator, variants) -> dict:
    """Perplexities of the variants and of the unpruned model, with the CPU and wall seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    perplexities = evaluator.perplexities(variants)
    unpruned = evaluator.unpruned()
    return {"cpu_seconds": time.process_time() - cpu, "seconds": time.perf_counter() - wall,
            "perplexities": perplexities, "unpruned": unpruned, "stats": evaluator.stats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default models/python-stdlib/llama_gqa")
    p.add_argument("--corpus-root", type=Path, default=None)
    p.add_argument("--windows", type=int, default=None, help="the first N full test windows only")
    p.add_argument("--group_idxs", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--methods", nargs="+", default=["default", "intra_fusion"])
    p.add_argument("--repair-batches", type=int, default=16, help="calibration batches of 4 windows")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--record", type=Path, default=Path("results/lm_grid_speed.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    release_large_buffers()
    lm = open_language_model("llama_gqa", args.checkpoint, args.corpus_root)
    windows = corpus_lib.eval_windows(lm.tokens("test"), lm.context)
    if args.windows is not None:
        windows = [windows[0][:args.windows]]
    calibration = calibration_windows(lm.tokens("train"), args.repair_batches, lm.context)
    cells = [(g, s, m) for g in args.group_idxs for s in args.sparsities for m in args.methods]
    variants = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g, s, m in cells:
            small = intrafusion.compress(lm.model, windows[0][:1, :lm.context], sparsity=s, groups=[g], method=m,
                                         calibration=calibration)
            share_unchanged(lm.model, small)
            variants.append(small)
    fast = timed(PerplexityEvaluator(lm.model, windows), variants)
    naive = timed(PerplexityEvaluator(lm.model, windows, fast=False), variants)
    difference = max(abs(a / b - 1) for a, b in zip(fast["perplexities"] + [fast["unpruned"]],
                                                    naive["perplexities"] + [naive["unpruned"]]))
    record = {"checkpoint": str(lm.folder), "checkpoint_sha256": lm.digest, "cells": cells,
              "tokens": sum(w[:, 1:].numel() for w in windows), "threads": torch.get_num_threads(),
              "fast": fast, "naive": naive, "cpu_ratio": naive["cpu_seconds"] / fast["cpu_seconds"],
              "wall_ratio": naive["seconds"] / fast["seconds"], "max_relative_difference": difference,
              "command": " ".join(["python", "bench/lm_grid_speed.py", *sys.argv[1:]]), "finished": time.ctime()}
    atomic_write(args.record, (json.dumps(record, indent=1) + "\n").encode(), "rerun the benchmark")
    print(f"{len(cells)} variants + the unpruned model on {record['tokens']:,} test tokens, "
          f"{record['threads']} threads")
    print(f"data-major: {fast['cpu_seconds']:.1f} CPU s ({fast['seconds']:.1f} s wall)")
    print(f"naive:      {naive['cpu_seconds']:.1f} CPU s ({naive['seconds']:.1f} s wall)")
    print(f"ratio: {record['cpu_ratio']:.2f}x CPU, {record['wall_ratio']:.2f}x wall; unpruned perplexity "
          f"{fast['unpruned']:.3f}; largest relative difference in perplexity {difference:.1e}")


if __name__ == "__main__":
    main()
