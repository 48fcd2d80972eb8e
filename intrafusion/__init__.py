"""Intra-Fusion: structured pruning that fuses pruned channels into kept ones via optimal transport.

    import intrafusion
    small = intrafusion.compress(model, example_inputs, sparsity=0.5)   # a new, smaller network
    intrafusion.save(small, "small.pt"); again = intrafusion.load("small.pt", model=fresh_model)

Inside Torch-Pruning's own pruner: `fold_batchnorms(model, example_inputs)` once, then
`fuse_group(group)` on every group `pruner.step(interactive=True)` yields, before `group.prune()`.
Bad input raises IntraFusionError (a ValueError) with a one-line message.
"""
from .api import compress, fold_batchnorms, fuse_group
from .errors import IntraFusionError
from .export import export_onnx

__all__ = ["compress", "save", "load", "fuse_group", "fold_batchnorms", "export_onnx",
           "IntraFusionError"]


def __getattr__(name: str):
    """save / load, from serialize.py, imported on first use (it reads the model zoo)."""
    if name in ("save", "load"):
        from . import serialize
        return getattr(serialize, name)
    raise AttributeError(f"module 'intrafusion' has no attribute {name!r}")
