"""Full fitness: every candidate scored on every search item (the base mode's behaviour)."""

from evomerge.search.modes.base import FidelityMode


class Full(FidelityMode):
    name = "full"
