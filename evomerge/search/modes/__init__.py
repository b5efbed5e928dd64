"""The fidelity modes (`evaluation.fidelity.mode`), one module each behind `base.FidelityMode`.

A new mode is one module here plus its line in `MODES` (and its name in `evaluate/spec.py`'s `Mode`);
the loop does not change.
"""

from __future__ import annotations

from typing import Any

from evomerge.search.modes.anchors import Anchors
from evomerge.search.modes.base import FidelityMode, Loop
from evomerge.search.modes.full import Full
from evomerge.search.modes.racing import Racing
from evomerge.search.modes.subsample import Subsample

MODES: dict[str, type[FidelityMode]] = {m.name: m for m in (Full, Subsample, Anchors, Racing)}

__all__ = ["MODES", "FidelityMode", "Loop", "describe_fidelity", "make_mode"]


def make_mode(spec, plan, loop: Loop) -> FidelityMode:
    return MODES[spec.mode](spec, plan, loop)


def describe_fidelity(fidelity: dict[str, Any]) -> str:
    """A journaled config's fidelity section in words (the report's summary row)."""
    return MODES[fidelity.get("mode", "full")].describe(fidelity)
