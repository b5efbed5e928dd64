"""Subsample: each round's candidates scored on the same m fresh items per task (see search/fidelity.py)."""

from __future__ import annotations

from typing import Any

from evomerge.runtime.jobs import Job
from evomerge.search.modes.base import CheapMode


class Subsample(CheapMode):
    name = "subsample"

    def candidate_job(self, key: tuple[int, int], recipe: dict) -> Job | None:
        return Job(("cand", *key), "search", recipe=recipe, items=self.plan.subsample(key[0]))

    @staticmethod
    def describe(fidelity: dict[str, Any]) -> str:
        return CheapMode.cheap(
            f"subsample: {fidelity.get('items')} fresh items per task each round", fidelity
        )
