"""The pruning methods, each described once: which channels' fate (discard or fuse), which fusion
rule, and whether the statistics are repaired on calibration data afterwards."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import IntraFusionError


@dataclass(frozen=True)
class Method:
    """name: as `--methods` spells it; fuse: Intra-Fusion (transport map) instead of discarding the
    pruned channels; rule: the fusion rule it forces (None: the configured one); repair: REPAIR-style
    statistics repair on calibration batches after pruning (needs data)."""

    name: str
    fuse: bool
    rule: str | None = None
    repair: bool = False

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
)}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
    """The Method called `name`; IntraFusionError naming the choices otherwise."""
    if name not in METHODS:
        raise IntraFusionError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]
