"""The pruning methods, each described once: which channels' fate (discard or fuse), which fusion
rule, and what is corrected on calibration data afterwards: the statistics (repair) or the
weights, refit by least squares to the unpruned network's outputs (reconstruct)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import IntraFusionError


@dataclass(frozen=True)
class Method:
    """name: as `--methods` spells it; fuse: Intra-Fusion (transport map) instead of discarding the
    pruned channels; rule: the fusion rule it forces (None: the configured one); repair: REPAIR-style
    statistics repair on calibration batches after pruning (needs data); reconstruct: every layer
    from the first changed one on refit by ridge least squares to the unpruned network's outputs
    on calibration batches (reconstruct.py; needs data)."""

    name: str
    fuse: bool
    rule: str | None = None
    repair: bool = False
    reconstruct: bool = False

    @property
    def needs_data(self) -> bool:
        """Whether the method needs calibration batches."""
        return self.repair or self.reconstruct

    @property
    def pruning(self) -> str:
        """The Pruner's method: "intra_fusion" or "default"."""
        return "intra_fusion" if self.fuse else "default"

    def fusion(self, settings):
        """`settings` (groups.FusionSettings) with this method's rule, if it forces one."""
        return dataclasses.replace(settings, rule=self.rule) if self.rule else settings


METHODS = {m.name: m for m in (
    Method("default", fuse=False),
    Method("intra_fusion", fuse=True),
    Method("default_repair", fuse=False, repair=True),
    Method("intra_fusion_repair", fuse=True, repair=True),
    Method("intra_fusion_varfix", fuse=True, rule="varfix"),
    Method("intra_fusion_varfix_repair", fuse=True, rule="varfix", repair=True),
    Method("default_reconstruct", fuse=False, reconstruct=True),
    Method("intra_fusion_reconstruct", fuse=True, reconstruct=True),
)}
METHOD_NAMES = tuple(METHODS)


def default_method(calibrated: bool) -> str:
    """compress's method when none is named: with calibration data default_reconstruct, the best
    measured (bench/reconstruct.py: on held-out training images it matches
    intra_fusion_reconstruct, 93.60 vs 93.50% at 25% of VGG11-BN's MACs and 92.06 vs 92.08% at
    10%, without the transport maps' cost, and beats intra_fusion_repair by 10 to 80 pt);
    without data intra_fusion, the best data-free one (RESULTS.md)."""
    return "default_reconstruct" if calibrated else "intra_fusion"


def get_method(name: str) -> Method:
    """The Method called `name`; IntraFusionError naming the choices otherwise."""
    if name not in METHODS:
        raise IntraFusionError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]
