"""torch-pruning's own LLM pruning on the shipped language model, under a time limit.

    python bench/lm_tp_pruner.py [--checkpoint models/python-stdlib/llama_gqa] [--ratio 0.2]
        [--timeout 120] [--record results/lm_tp_pruner.json]

As torch-pruning's LLM example prunes a Llama: tp.pruner.MetaPruner with a magnitude importance
(MagnitudeImportance, p=2, the group's mean), the LM head ignored, each attention module's q/k/v
projections with their head counts (num_heads), whole heads pruned (prune_num_heads, at
head_pruning_ratio = --ratio) and head dimensions kept, widths rounded to 4, --ratio of every
other group's channels pruned; then one step, and the test perplexity of the result. Two ways of
handing the model over are tried, each in a process of its own whose pruner is stopped --timeout
seconds after it is started (with a stack sample): the transformers model itself, its output's
logits taken by output_transform (as the example does), and a wrapper whose forward returns the
logits (what intrafusion's CNN path asks for); the wrapper also without head pruning
(prune_num_heads=False: MLP channels and the hidden size pruned, heads kept). decoder.py's module
docstring says why the dependency graph may not return on rotary embeddings.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from intrafusion.storage import atomic_write  # noqa: E402

WAYS = (("transformers model, output_transform=logits", False, "heads"),  # (label, wrapped, attention)
        ("wrapped: forward returns the logits", True, "heads"),
        ("wrapped, no head pruning (prune_num_heads=False)", True, "kept"),
        ("wrapped, attention projections ignored", True, "ignored"))


class Logits(nn.Module):
    """model(x).logits as the forward of a plain module."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(x, use_cache=False).logits


def child(way: int, checkpoint: Path | None, corpus_root: Path | None, ratio: float, limit: float) -> dict:
    """Build the pruner, step it and measure the result; a stack sample on stderr (and exit) at `limit`."""
    import faulthandler
    import torch_pruning as tp
    from intrafusion.experiments import corpus as corpus_lib
    from intrafusion.experiments.lm_data import PerplexityEvaluator, lm_costs, open_language_model
    lm = open_language_model("llama_gqa", checkpoint, corpus_root)
    model = lm.model
    before = lm_costs(model, lm.context)
    example = lm.tokens("train")[None, :lm.context]
    heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads.update({m.q_proj: model.config.num_attention_heads, m.k_proj: model.config.num_key_value_heads,
                          m.v_proj: model.config.num_key_value_heads})
    _, wrapped, attention = WAYS[way]
    prune_heads = attention == "heads"
    ignored = [model.lm_head] + ([m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"))]
                                 if attention == "ignored" else [])
    root = Logits(model) if wrapped else model
    options = {} if wrapped else dict(output_transform=lambda out: out.logits)
    faulthandler.dump_traceback_later(limit, exit=True)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(root, example_inputs=example,
                                  importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
                                  global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
                                  num_heads=heads, prune_num_heads=prune_heads, prune_head_dims=False,
                                  head_pruning_ratio=ratio if prune_heads else 0.0, round_to=4, **options)
    built = time.perf_counter() - start
    print(f"pruner built in {built:.1f} s", file=sys.stderr, flush=True)
    pruner.step()
    faulthandler.cancel_dump_traceback_later()
    windows = corpus_lib.eval_windows(lm.tokens("test"), lm.context)
    return {"built_seconds": built, "step_seconds": time.perf_counter() - start - built,
            "perplexity": PerplexityEvaluator(model, windows).unpruned(), "before": before,
            "after": lm_costs(model, lm.context)}


def attempt(way: int, args) -> dict:
    command = [sys.executable, __file__, "--child", str(way), "--ratio", str(args.ratio),
               "--timeout", str(args.timeout)] + (["--checkpoint", str(args.checkpoint)] if args.checkpoint else [])
    command += ["--corpus-root", str(args.corpus_root)] if args.corpus_root else []
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout + 600)
    except subprocess.TimeoutExpired:  # loading took 10 minutes: the limit starts after it
        return {"way": WAYS[way][0], "result": "killed", "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return {"way": WAYS[way][0], "result": "returned", "seconds": seconds,
                **json.loads(proc.stdout.strip().splitlines()[-1])}
    timed_out = "Timeout" in proc.stderr
    # faulthandler writes each thread's frames innermost first; keep the thread inside torch-pruning
    threads = proc.stderr.split("\nThread ")[1:] if timed_out else [proc.stderr]
    text = next((t for t in threads if "torch_pruning" in t), threads[0])
    stack = [line.strip() for line in text.splitlines() if line.strip().startswith("File")]
    stack = stack if timed_out else stack[::-1]
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    built = [line.split()[3] for line in proc.stderr.splitlines() if line.startswith("pruner built in ")]
    return {"way": WAYS[way][0], "result": f"no result after {args.timeout:.0f} s" if timed_out else "error",
            "seconds": seconds, "built_seconds": float(built[0]) if built else None,
            "error": None if timed_out else last, "stack": stack[:12]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--corpus-root", type=Path, default=None)
    p.add_argument("--ratio", type=float, default=0.2, help="pruning_ratio and head_pruning_ratio")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds each way is given")
    p.add_argument("--ways", type=int, nargs="+", default=list(range(len(WAYS))),
                   help="which ways to try (indices into WAYS)")
    p.add_argument("--record", type=Path, default=Path("results/lm_tp_pruner.json"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.checkpoint, args.corpus_root, args.ratio, args.timeout)))
        return
    results = [attempt(way, args) for way in args.ways]
    record = {"torch_pruning": version("torch-pruning"), "torch": torch.__version__, "ratio": args.ratio,
              "timeout": args.timeout, "attempts": results,
              "command": " ".join(["python", "bench/lm_tp_pruner.py", *sys.argv[1:]]), "finished": time.ctime()}
    atomic_write(args.record, (json.dumps(record, indent=1) + "\n").encode(), "rerun the benchmark")
    for r in results:
        built = f", pruner built in {r['built_seconds']:.0f} s" if r.get("built_seconds") else ""
        print(f"{r['way']}: {r['result']} ({r['seconds']:.0f} s{built})" + (f"; {r['error']}" if r.get("error") else ""))
        if r.get("stack"):
            print("  stack (innermost first): " + " | ".join(r["stack"][:4]))


if __name__ == "__main__":
    main()
