"""The `compress` and `evaluate` commands for a language model (compress.py hands them over when
--model-name is one of models.LANGUAGE_MODEL_NAMES): compress the trained model of a folder to a
budget of its decoder blocks, measure the test perplexity, and write a folder that `evaluate`
measures again.

The output folder holds config.json, tokenizer.json and metrics.json (written last: its presence
means the folder is complete; it names the corpus digest and the test perplexity) and the weights:
model.safetensors (save_pretrained, loadable by transformers' from_pretrained) when every block
has the same widths, else model.pt (intrafusion.save) with the config of the widths the blocks
share (lm_training.load_language_model reads either). The report (the same name, .json) has
the perplexity, parameters and MACs of the blocks and of the whole model, unpruned and
compressed, and the sparsity of each group. Data as lm_data.py says: calibration windows from
the train split, held-out windows from the held-out split, the test split for the report only.
"""
from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from . import corpus as corpus_lib
from .lm_data import (CALIBRATION_WINDOWS, LANGUAGE_DATASETS, PerplexityEvaluator, calibration_windows,
                      check_pairing, held_out_windows, is_language_model, lm_costs, open_folder,
                      open_language_model, unit_widths)
from ..decoder import LM_ALLOCATIONS, LM_CRITERIA, sync_widths
from ..errors import IntraFusionError, check_at_least
from ..serialize import save
from ..storage import atomic_write, check_writable

_HINT = "rerun the compress command"


def validate_lm(config) -> None:
    """Reject settings (a compress.CompressConfig) that cannot work for a language model before
    anything is loaded or written (the budget and the data a method needs: compress.check_budget_and_data)."""
    check_pairing(config.model_name, config.dataset)
    for value, choices, what in ((config.criterion, LM_CRITERIA, "criterion"),
                                 (config.allocation, LM_ALLOCATIONS, "allocation")):
        if value not in choices:
            raise IntraFusionError(f"{what} {value!r} is not available for language models; choose one "
                                   f"of {', '.join(choices)}")
    check_at_least(("--calibration-batches", config.calibration_batches, 0), ("--held-out", config.held_out, 1))
    unsupported = [flag for flag, given in (("--finetune-epochs", config.finetune_epochs), ("--onnx", config.onnx),
                                            ("--iterative", config.iterative), ("--workers", config.workers > 1),
                                            ("--ray-address", config.ray_address)) if given]
    if unsupported:
        raise IntraFusionError(f"{unsupported[0]} is not available for language models")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise IntraFusionError(f"--out {out} is a file; a compressed language model is a folder")
    for path in [out / n for n in ("config.json", "tokenizer.json", "metrics.json", "model.safetensors", "model.pt")] + [config.report_path()]:
        check_writable(path)


def save_language_model(model: nn.Module, tokenizer, metrics: dict, out: Path) -> str:
    """Write the compressed `model` (module docstring) into folder `out`, the other weights file
    and metrics.json removed first (a folder cut short by a crash is never complete); the format
    written: "save_pretrained" or "intrafusion.save"."""
    out = Path(out)
    uniform = sync_widths(model)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)
        (out / ("model.pt" if uniform else "model.safetensors")).unlink(missing_ok=True)
        if uniform:
            model.save_pretrained(out, safe_serialization=True)
        else:
            model.config.save_pretrained(out)
    except OSError as exc:
        raise IntraFusionError(f"could not write {out} ({exc.strerror or exc}): {_HINT}") from None
    if not uniform:
        save(model, out / "model.pt")
    atomic_write(out / "tokenizer.json", tokenizer.to_str().encode(), _HINT)
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode(), _HINT)
    return "save_pretrained" if uniform else "intrafusion.save"


def _kept(compressed: dict, base: dict) -> dict:
    return {k: round(compressed[k] / base[k], 6) for k in ("params", "macs", "block_params", "block_macs")}


def run_compress_lm(config, log=print) -> dict:
    """Compress the language model (config: a compress.CompressConfig, checked by
    compress.validate), save it to the folder config.out and its report beside it (.json); return
    the report."""
    from ..api import compress
    start = time.perf_counter()
    kind, value = config.budget()
    device = torch.device(config.device)
    lm = open_language_model(config.model_name, config.checkpoint, config.corpus_root)
    model = lm.model.to(device)
    train = lm.tokens("train")
    calibration = [w.to(device) for w in calibration_windows(train, config.calibration_batches, lm.context)]
    held_out = None
    if config.allocation == "sensitivity":
        held_out = held_out_windows(lm.tokens("heldout"), config.held_out, lm.context).to(device)
        log(f"held-out: {len(held_out)} windows of {held_out.shape[1]} tokens")
    test = PerplexityEvaluator(model, [w.to(device) for w in corpus_lib.eval_windows(lm.tokens("test"), lm.context)])
    with warnings.catch_warnings():  # it is saved as its widths need (save_language_model)
        warnings.filterwarnings("ignore", message=".*cannot describe its widths")
        small = compress(model, train[None, :lm.context].to(device), **{kind: value}, method=config.method,
                         criterion=config.criterion, calibration=calibration or None,
                         allocation=config.allocation, held_out=held_out, round_to=config.round_to)
    perplexity, = test.perplexities([small])
    base = {"perplexity": test.unpruned(), **lm_costs(model, lm.context)}
    compressed = {"perplexity": perplexity, **lm_costs(small, lm.context)}
    before, after = unit_widths(model), unit_widths(small)
    sparsities = {str(g): round(1 - k / n, 6) for g, (n, k) in enumerate(zip(before, after)) if k < n}
    metrics = {"dataset": config.dataset, "model": config.model_name, "compressed_from": str(lm.folder),
               "corpus_digest": lm.corpus.digest, "test_perplexity": perplexity, "test_tokens": test.tokens,
               "python": platform.python_version()}
    written = save_language_model(small, lm.tokenizer, metrics, Path(config.out))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    report = {"base": base, "compressed": compressed, "kept": _kept(compressed, base),
              "sparsities": sparsities, "units": {"unpruned": before, "compressed": after},
              "format": written, "test_tokens": test.tokens, "macs_per": f"window of {lm.context} tokens",
              "settings": {**settings, "checkpoint_sha256": lm.digest,
                           "calibration_windows": len(calibration) * CALIBRATION_WINDOWS,
                           "held_out_windows": 0 if held_out is None else len(held_out)},
              "seconds": round(time.perf_counter() - start, 2)}
    atomic_write(config.report_path(), (json.dumps(report, indent=1) + "\n").encode(), _HINT)
    log(f"{config.model_name} on {config.dataset}: unpruned test perplexity {base['perplexity']:.3f}, "
        f"{base['block_params'] / 1e6:.2f} M block parameters ({base['params'] / 1e6:.2f} M in all)")
    log(f"compressed: test perplexity {perplexity:.3f}, {100 * report['kept']['block_params']:.1f}% of the "
        f"blocks' parameters, {100 * report['kept']['block_macs']:.1f}% of their MACs "
        f"({100 * report['kept']['params']:.1f}% / {100 * report['kept']['macs']:.1f}% of the whole model); "
        f"wrote {config.out} ({written}) and {config.report_path()}")
    return report


def evaluate_saved_lm(path: Path | str, dataset: str, corpus_root: Path | None = None,
                      device: str = "cpu") -> dict:
    """{"perplexity" (the test split), "tokens" (scored), "window_tokens" (what the MACs are
    counted for), "params", "macs", "block_params", "block_macs"} of the compressed language
    model in folder `path` (the compress report's "compressed")."""
    if dataset not in LANGUAGE_DATASETS:
        raise IntraFusionError(f"unknown dataset {dataset!r} for a language model; choose one of "
                               f"{', '.join(LANGUAGE_DATASETS)}")
    path = Path(path)
    if not path.is_dir():
        raise IntraFusionError(f"{path} is not a folder: a compressed language model is the folder that "
                               "`intrafusion compress --out` wrote")
    lm = open_folder(path, corpus_root)
    if not is_language_model(str(lm.metrics.get("model"))):
        raise IntraFusionError(f"{path / 'metrics.json'} names no known language model")
    model = lm.model.to(device)
    test = PerplexityEvaluator(model, [w.to(device) for w in corpus_lib.eval_windows(lm.tokens("test"), lm.context)])
    return {"perplexity": test.unpruned(), "tokens": test.tokens, "window_tokens": lm.context,
            **lm_costs(model, lm.context)}
