"""Which search items a candidate pays for (`evaluation.fidelity`), and how its fitness is estimated.

Everything here is a pure function of the config (split seed, tasks, sizes), the round and the journaled
per-item results, so a resumed run and any number of Ray workers choose exactly the same items. Items
are document ids by task; tasks that share a split (`split_as`) share their items, so a problem is scored
in all of its tasks or in none.

- `subsample`: each round draws m items per task (seeded by split seed and round), the same for all of
  the round's candidates, so comparisons inside a round are paired. A new round, new items: no candidate
  is selected on the noise of one fixed subset for the whole run.
- `racing`: successive halving inside a round. Every candidate starts on the first m items of the
  round's order; the best 1/eta (by their estimate on the items scored so far) go on to eta x as many
  items, and so on until the last rung, which is the whole search split. A candidate pays only for the
  items it reaches (each rung scores just the items it adds).
- `anchors`: anchor points (Vivek et al., "Anchor Points: Benchmarking Models with Much Fewer Examples",
  EACL 2024; the same clustering is the "anchor points" estimator of Polo et al., "tinyBenchmarks",
  ICML 2024). Items are described by the per-item results of models already scored on the whole search
  split (the parents and default merges, scored before the search; then, every `refresh` rounds, the
  round's best candidate, re-scored in full). The items are clustered into m groups (k-medoids); each
  group's medoid is an anchor, weighted by the number of items it stands for; a candidate is scored on
  the anchors only and its task metric estimated as the weighted mean of its anchor results.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from evomerge.evaluate.spec import FidelitySpec, TaskSpec

Items = dict[str, list[int]]  # document ids by task
Values = dict[str, dict[int, float]]  # per-item metric values by task


def _seed(*parts) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass(frozen=True)
class Anchors:
    items: Items
    weights: dict[str, dict[int, float]]  # task -> anchor id -> how many items it stands for


class ItemPlan:
    """The search split of every task and the item sets the fidelity mode scores candidates on."""

    def __init__(self, spec: FidelitySpec, tasks: list[TaskSpec], search: Items, split_seed: int) -> None:
        self.spec, self.split_seed = spec, split_seed
        self.search = {name: sorted(ids) for name, ids in search.items()}
        self.weights = {t.name: t.weight for t in tasks}
        self.groups: dict[str, list[str]] = defaultdict(list)
        for t in tasks:
            self.groups[t.split_as or t.name].append(t.name)
        self.group_ids = {
            g: sorted(set().union(*(self.search[n] for n in names))) for g, names in self.groups.items()
        }
        self._first: dict[tuple[int, int], Items] = {}

    @property
    def mode(self) -> str:
        return self.spec.mode

    def order(self, generation: int) -> dict[str, list[int]]:
        """Each task's search items in the round's seeded order (tasks sharing a split share it)."""
        out = {}
        for group, names in self.groups.items():
            rng = np.random.default_rng(_seed(self.split_seed, "fidelity", generation, group))
            order = [self.group_ids[group][i] for i in rng.permutation(len(self.group_ids[group]))]
            for name in names:
                own = set(self.search[name])
                out[name] = [i for i in order if i in own]
        return out

    def first(self, generation: int, count: int) -> Items:
        """The first `count` items per task of the round's order (a subsample; a racing rung)."""
        key = (generation, count)
        if key not in self._first:
            if len(self._first) > 64:
                self._first.clear()
            self._first[key] = {name: sorted(ids[:count]) for name, ids in self.order(generation).items()}
        return {name: list(ids) for name, ids in self._first[key].items()}

    def subsample(self, generation: int) -> Items:
        return self.first(generation, self.spec.items)

    # -- racing --------------------------------------------------------------------------------------

    def rung_sizes(self) -> list[int]:
        """Items per task at each rung: m, eta*m, ... up to the largest task's whole search split."""
        largest = max(len(ids) for ids in self.search.values())
        size = self.spec.items or max(1, math.ceil(largest / 8))
        sizes = [size]
        while sizes[-1] < largest:
            sizes.append(min(largest, sizes[-1] * self.spec.eta))
        return sizes

    def rung_items(self, generation: int, rung: int) -> Items:
        """The items rung `rung` adds to the ones the candidate was scored on before."""
        sizes = self.rung_sizes()
        now = self.first(generation, sizes[rung])
        if rung == 0:
            return now
        before = self.first(generation, sizes[rung - 1])
        return {name: sorted(set(ids) - set(before[name])) for name, ids in now.items()}

    def is_full(self, values: Values) -> bool:
        return all(len(values.get(name, {})) == len(ids) for name, ids in self.search.items())

    # -- estimates -----------------------------------------------------------------------------------

    def mean_estimate(self, values: Values) -> tuple[float, dict[str, float]]:
        """(fitness, metric by task) from per-item values: each task's metric is the mean of its items."""
        metrics = {name: float(np.mean(list(v.values()))) for name, v in values.items() if v}
        return sum(self.weights[n] * m for n, m in metrics.items()), metrics

    def anchor_estimate(self, anchors: Anchors, values: Values) -> tuple[float, dict[str, float]]:
        metrics = {}
        for name, weights in anchors.weights.items():
            total = sum(weights.values())
            metrics[name] = sum(w * values[name][i] for i, w in weights.items()) / total
        return sum(self.weights[n] * m for n, m in metrics.items()), metrics

    # -- anchors -------------------------------------------------------------------------------------

    def anchor_version(self, generation: int) -> int:
        """The anchor set round `generation` uses: evidence through the refresh round two rounds back,
        so it is journaled (or nearly) when the round's first candidates are asked."""
        return max(0, (generation - 1) // self.spec.refresh) if generation > 0 else 0

    def refresh_rounds(self, version: int) -> list[int]:
        """The rounds whose best candidate is re-scored in full to grow the evidence of `version`."""
        return [j * self.spec.refresh - 1 for j in range(1, version + 1)]

    def is_refresh_round(self, generation: int) -> bool:
        return (generation + 1) % self.spec.refresh == 0

    def choose_anchors(self, evidence: list[Values], version: int) -> Anchors:
        """k-medoids over the items described by their results under every evidence model (each item's
        contribution to fitness), per group of tasks that share a split; m medoids per group."""
        items: Items = {}
        weights: dict[str, dict[int, float]] = {}
        for group, names in self.groups.items():
            ids = self.group_ids[group]
            features = np.zeros((len(ids), max(1, len(evidence))))
            for col, values in enumerate(evidence):
                for name in names:
                    scale = self.weights[name] / max(1, len(self.search[name]))
                    task_values = values.get(name, {})
                    features[:, col] += [scale * task_values.get(i, 0.0) for i in ids]
            medoids, sizes = k_medoids(
                features, min(self.spec.items, len(ids)), _seed(self.split_seed, "anchors", version, group)
            )
            chosen = {ids[m]: float(n) for m, n in zip(medoids, sizes, strict=True)}
            for name in names:
                own = set(self.search[name])
                weights[name] = {i: w for i, w in chosen.items() if i in own}
                items[name] = sorted(weights[name])
        return Anchors(items, weights)


def k_medoids(features: np.ndarray, k: int, seed: int, iterations: int = 30) -> tuple[list[int], list[int]]:
    """(medoid rows, cluster sizes): k-means++ seeding, then alternating assignment and medoid update
    (each cluster's member with the least total distance to the others), until nothing changes."""
    rng = np.random.default_rng(seed)
    n = len(features)
    medoids = [int(rng.integers(n))]
    nearest = ((features - features[medoids[0]]) ** 2).sum(axis=1)
    while len(medoids) < k:
        total = nearest.sum()
        if total <= 0:  # every item is a copy of a chosen one: pick the rest uniformly
            rest = [i for i in range(n) if i not in set(medoids)]
            medoids += [int(i) for i in rng.choice(rest, size=k - len(medoids), replace=False)]
            break
        pick = int(rng.choice(n, p=nearest / total))
        medoids.append(pick)
        nearest = np.minimum(nearest, ((features - features[pick]) ** 2).sum(axis=1))
    for _ in range(iterations):
        distances = np.sqrt(((features[:, None, :] - features[None, medoids, :]) ** 2).sum(axis=2))
        assign = distances.argmin(axis=1)
        changed = False
        for c in range(k):
            members = np.flatnonzero(assign == c)
            if members.size == 0:
                continue
            inner = np.sqrt(((features[members, None, :] - features[None, members, :]) ** 2).sum(axis=2))
            cost = inner.sum(axis=1)
            current = np.flatnonzero(members == medoids[c])
            if current.size and cost[current[0]] <= cost.min() + 1e-15:
                continue  # a tie keeps the current medoid: the loop ends
            medoids[c], changed = int(members[cost.argmin()]), True
        if not changed:
            break
    distances = np.sqrt(((features[:, None, :] - features[None, medoids, :]) ** 2).sum(axis=2))
    assign = distances.argmin(axis=1)
    sizes = [int((assign == c).sum()) for c in range(k)]
    return medoids, sizes
