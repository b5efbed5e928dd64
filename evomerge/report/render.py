"""Write an experiment's report: leaderboard.md (+ PNG plots beside it), a self-contained report.html
(plots embedded, every string from configs or model names escaped) and leaderboard.csv."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import UserError
from evomerge.files import atomic_write, one_line
from evomerge.results import ExperimentView, search_fitness, task_cell
from evomerge.results import fmt as _fmt
from evomerge.search.objectives import (
    LENGTH_METRIC,
    Objective,
    hypervolume,
    objectives_from,
    pareto_front,
    vector,
)

TOP = 10


def fitness_plot(view: ExperimentView) -> bytes:
    """Per-evaluation fitness (dots, failed ones marked at the bottom) and the best so far (line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    xs = list(range(1, len(view.candidates) + 1))
    ok = [(x, c.fitness) for x, c in zip(xs, view.candidates, strict=True) if c.ok]
    if ok:
        ax.scatter([p[0] for p in ok], [p[1] for p in ok], s=9, alpha=0.5, label="evaluation")
        floor = min(p[1] for p in ok)
        best = [b if b > float("-inf") else None for b in view.best_so_far()]
        ax.plot(xs, [floor if b is None else b for b in best], color="C3", lw=2, label="best so far")
    failed = [x for x, c in zip(xs, view.candidates, strict=True) if not c.ok]
    if failed:
        low = min((p[1] for p in ok), default=0.0)
        ax.scatter(failed, [low] * len(failed), marker="x", color="k", s=14, label="failed")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("fitness (search split)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def recipe_plot(view: ExperimentView) -> bytes | None:
    """The best recipe as a heatmap: tensor groups x (source, parameter)."""
    best = view.best
    if best is None:
        return None
    from evomerge.merge.recipe import ConfigRecipe, PathRecipe, parse_recipe

    plt = _pyplot()
    recipe = parse_recipe(best.recipe)  # old journals' spellings read as today's
    if isinstance(recipe, PathRecipe):
        return _path_plot(plt, view, best.id, recipe)
    if isinstance(recipe, ConfigRecipe):
        names, labels, rows = config_table(recipe.config, view.config["models"]["sources"])
        columns = [(label,) for label in labels]
        method = recipe.config["merge_method"]
    else:
        names, columns, rows = _recipe_table(recipe, view.sources)
        method = best.recipe["method"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(columns), 0.9 + 0.32 * len(names)), dpi=110)
    image = ax.imshow(rows, aspect="auto", cmap="viridis")
    for i, row in enumerate(rows):
        for k, value in enumerate(row):
            ax.text(k, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xticks(range(len(columns)), [c[0] for c in columns], fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"best recipe (candidate {best.id}, {method})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    return _png(fig)


def _recipe_table(recipe, sources: list[str]):
    """(group names, columns (label, parameter, source index or None), values) of a recipe."""
    groups = recipe.groups
    names = list(groups)
    sample = groups[names[0]].values
    columns = []
    for key, value in sample.items():
        if isinstance(value, tuple):
            columns += [(f"{source}\n{key}", key, j) for j, source in enumerate(sources)]
        else:
            columns.append((key, key, None))

    def cell(group, key, j) -> float:
        value = group.get(key)  # a group without genes may lack a parameter (its default applies)
        return float("nan") if value is None else value if j is None else value[j]

    return names, columns, [[cell(groups[n], key, j) for _, key, j in columns] for n in names]


def config_table(config: dict, refs: list[str]):
    """(row labels, column labels, values) of a merge-config candidate (a migrated mergekit-evolve run):
    one row per slice (layer range), or per gradient point of a smooth config; one column per model,
    parameter and filter. A slerp slice shows each model's share of it (1 - t for the first, t for the
    second, 0 for the others)."""
    from evomerge.config import source_labels

    name = dict(zip(refs, source_labels(refs), strict=True))

    def settings(params: dict | None, who: str, row: dict, point: int | None) -> None:
        for key, value in (params or {}).items():
            if isinstance(value, list) and value and isinstance(value[0], dict):  # filters
                for cond in value:
                    settings({f"{key}[{cond.get('filter') or 'rest'}]": cond["value"]}, who, row, point)
                continue
            if isinstance(value, list):  # a gradient
                value = value[point] if point is not None and point < len(value) else value[-1]
            if not isinstance(value, bool) and isinstance(value, int | float):
                row[f"{who}\n{key}"] = float(value)

    rows: list[tuple[str, dict]] = []
    if config.get("slices"):
        for piece in config["slices"]:
            first = piece["sources"][0]["layer_range"]
            row: dict = {}
            if config["merge_method"] == "slerp":
                t = float(piece["parameters"]["t"])
                pair = [s["model"] for s in piece["sources"][:2]]
                row = {f"{name.get(r, r)}\nshare": 0.0 for r in refs}
                row[f"{name.get(pair[0], pair[0])}\nshare"] = 1 - t
                row[f"{name.get(pair[1], pair[1])}\nshare"] = t
            else:
                for src in piece["sources"]:
                    settings(src.get("parameters"), name.get(src["model"], src["model"]), row, None)
            rows.append((f"layers {first[0]}-{first[1] - 1}", row))
    else:
        lengths = [len(v) for m in config["models"] for v in (m.get("parameters") or {}).values()
                   if isinstance(v, list) and v and not isinstance(v[0], dict)]  # fmt: skip
        for point in range(max(lengths, default=1)):
            row = {}
            for m in config["models"]:
                settings(m.get("parameters"), name.get(m["model"], m["model"]), row, point)
            rows.append((f"gradient point {point}", row))
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    values = [[row.get(c, float("nan")) for c in columns] for _, row in rows]
    return [label for label, _ in rows], columns, values


def _path_plot(plt, view: ExperimentView, candidate_id: int, recipe) -> bytes:
    """A DFS path as a strip: one cell per hop, coloured by source, labelled with layer and scale."""
    path, scales = recipe.path, recipe.scales
    fig, ax = plt.subplots(figsize=(min(2 + 0.55 * len(path), 16), 1.9), dpi=110)
    for hop, ((source, layer), scale) in enumerate(zip(path, scales, strict=True)):
        ax.add_patch(
            plt.Rectangle((hop, 0), 0.95, 1, color=f"C{source}", alpha=0.35 + 0.65 * min(scale, 2) / 2)
        )
        ax.text(hop + 0.47, 0.62, f"L{layer}", ha="center", va="center", fontsize=7)
        ax.text(hop + 0.47, 0.3, f"×{scale:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xlim(0, len(path))
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_xlabel("hop")
    names = view.sources
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(names))]
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ends = f"; embeddings from {names[recipe.ends[0]]}, head from {names[recipe.ends[1]]}"
    ax.set_title(f"best path (candidate {candidate_id}): source, layer, scale{ends}", fontsize=9)
    return _png(fig)


def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    return buffer.getvalue()


# -- tables (rows of plain strings, shared by markdown, HTML and the terminal) ----------------------------


def summary_rows(view: ExperimentView) -> list[tuple[str, str]]:
    cfg = view.config
    rows = [
        ("experiment", view.name),
        ("directory", str(view.dir)),
        ("method", cfg.get("merge", {}).get("method", "")),
        ("optimizer", cfg.get("optimizer", {}).get("name", "")),
        ("evaluations", f"{len(view.candidates)} of {view.budget}" + ("" if view.finished else " (in progress or stopped)")),
        ("failed", str(len(view.candidates) - len(view.ok))),
        ("fitness", _fidelity_text(view.fidelity)),
    ]  # fmt: skip
    if view.item_evals:
        cost = view.full_cost
        saved = (
            f" ({cost * len(view.candidates) / view.item_evals:.1f}x fewer than full fitness)" if cost else ""
        )
        rows.append(("item-evaluations", f"{view.item_evals:,}{saved}"))
    rows += [("warning", line.removeprefix("warning: ")) for line in heldout_warnings(view)]
    rows += [
        ("wall time", f"{view.wall_seconds / 60:.1f} min"),
        ("evals/min (busy)", f"{view.evals_per_minute:.1f}"),
    ]
    return rows


def heldout_warnings(view: ExperimentView) -> list[str]:
    from evomerge.evaluate.spec import small_heldout_warnings

    return small_heldout_warnings(view.heldout_sizes)


def _fidelity_text(fidelity: dict[str, Any]) -> str:
    from evomerge.search.modes import describe_fidelity

    return describe_fidelity(fidelity)


def heldout_rows(view: ExperimentView) -> tuple[list[str], list[list[str]]]:
    header = ["model", "held-out fitness", "gain over best parent", *view.tasks]
    parent = view.best_parent()
    rows = []
    for f in sorted(view.finals, key=lambda f: (-f.fitness, f.name)):
        gain = f"{f.fitness - parent.fitness:+.4f}" if parent is not None and f.status == "ok" else ""
        value = _fmt(f.fitness) if f.status == "ok" else f"failed: {f.reason}"
        rows.append([f.name, value, gain, *(_fmt(view.metric(f.metrics, t)) for t in view.tasks)])
    return header, rows


BOOTSTRAP = 2000


def paired_rows(view: ExperimentView) -> tuple[list[str], list[list[str]]]:
    """The winner against the best parent and the best default merge, item by item on the held-out split:
    per task, the items only one of the two gets right (metrics valued 0/1; otherwise the items where one
    scores higher), the mean gain, and a paired bootstrap 95% interval of it (items resampled together,
    seeded); a last row per comparison does the same for the weighted fitness."""
    header = [
        "comparison",
        "task",
        "items",
        "only winner better",
        "only other better",
        "gain",
        "95% interval",
    ]
    evolved = next((f for f in view.finals if f.name == "evolved" and f.status == "ok"), None)
    rows: list[list[str]] = []
    if evolved is None:
        return header, rows
    mine = view.final_items.get(evolved.name, {})
    for other in (view.best_parent(), view.best_default()):
        if other is None:
            continue
        theirs = view.final_items.get(other.name, {})
        label = f"evolved vs {other.name}"
        diffs, weights = [], []
        for task in view.tasks:
            a, b = mine.get(task), theirs.get(task)
            if a is None or b is None or not np.array_equal(a.ids, b.ids):
                continue
            diff = a.values - b.values
            binary = set(np.unique(np.concatenate([a.values, b.values]))) <= {0.0, 1.0}
            better = f"{int((diff > 0).sum())}" + (" right" if binary else "")
            worse = f"{int((diff < 0).sum())}" + (" right" if binary else "")
            low, high = _bootstrap([diff], [1.0])
            rows.append(
                [
                    label,
                    task,
                    str(len(diff)),
                    better,
                    worse,
                    f"{diff.mean():+.4f}",
                    f"[{low:+.4f}, {high:+.4f}]",
                ]
            )
            diffs.append(diff)
            weights.append(view.weights.get(task, 1.0))
        if len(diffs) > 1:
            low, high = _bootstrap(diffs, weights)
            gain = sum(w * d.mean() for w, d in zip(weights, diffs, strict=True))
            rows.append(
                [label, "fitness (weighted)", "", "", "", f"{gain:+.4f}", f"[{low:+.4f}, {high:+.4f}]"]
            )
    return header, rows


def view_objectives(view: ExperimentView) -> list[Objective]:
    """The journaled experiment's objectives (none for a single-objective one)."""
    from evomerge.config import ObjectiveSpec

    specs = [ObjectiveSpec.model_validate(o) for o in view.config.get("objectives") or []]
    return objectives_from(specs, view.tasks)


def front_rows(view: ExperimentView) -> tuple[list[str], list[list[str]], str]:
    """The Pareto front on the held-out split: each front member's (and each parent's) held-out value of
    every objective, and the held-out items of the objectives' tasks that it alone among the front solves;
    then the front's hypervolume against the reference point (stated)."""
    objectives = view_objectives(view)
    members = [f for f in view.finals if f.kind == "evolved" and f.status == "ok"]
    parents = [f for f in view.finals if f.kind == "parent" and f.status == "ok"]
    if not objectives or not members:
        return [], [], ""
    header = ["model", "candidate", *(f"{o.label} ({'max' if o.maximize else 'min'})" for o in objectives)]
    header.append("items only it solves")
    vectors = {f.name: vector(objectives, f.metrics) for f in members}
    on_front = {members[i].name for i in pareto_front([vectors[f.name] for f in members])}
    solved = {f.name: _solved(view, f.name, objectives) for f in members}
    rows = []
    for f in [*members, *parents]:
        values = [o.raw(f.metrics) for o in objectives]
        alone = ""
        if f.name in solved:
            others = set().union(*(v for n, v in solved.items() if n != f.name))
            alone = str(len(solved[f.name] - others))
        name = f.name + ("" if f.kind != "evolved" or f.name in on_front else " (dominated on held-out)")
        rows.append(
            [name, "" if f.candidate_id is None else str(f.candidate_id), *(_num(v) for v in values), alone]
        )
    reference = front_reference(objectives, [*members, *parents])
    volume = hypervolume(
        [vectors[n] for n in on_front],
        [r if o.maximize else -r for o, r in zip(objectives, reference, strict=True)],
    )
    shown = ", ".join(f"{o.label} {r:g}" for o, r in zip(objectives, reference, strict=True))
    return header, rows, f"hypervolume of the held-out front: {volume:.4f} (reference point: {shown})"


def front_reference(objectives: list[Objective], finals: list) -> list[float]:
    """The reference point: each objective's stated `reference`; unstated, 0 for an objective maximised (a
    score no model is worse than), and for one minimised the worst value any finalist or parent reached."""
    worst = [
        max((o.raw(f.metrics) for f in finals if math.isfinite(o.raw(f.metrics))), default=0.0)
        for o in objectives
    ]
    return [
        o.reference if o.reference is not None else 0.0 if o.maximize else w
        for o, w in zip(objectives, worst, strict=True)
    ]


def _solved(view: ExperimentView, name: str, objectives: list[Objective]) -> set[tuple[str, int]]:
    items = view.final_items.get(name, {})
    out = set()
    for task in {o.task for o in objectives if o.metric != LENGTH_METRIC}:
        if task in items:
            out |= {(task, int(i)) for i, v in zip(items[task].ids, items[task].values, strict=True) if v > 0}
    return out


def _num(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else ""


def front_plot(view: ExperimentView) -> bytes | None:
    """The first two objectives on the held-out split: the front's members, the winner and the parents."""
    objectives = view_objectives(view)
    members = [f for f in view.finals if f.kind == "evolved" and f.status == "ok"]
    if len(objectives) < 2 or not members:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    x, y = objectives[0], objectives[1]
    for group, style, label in (
        ([f for f in members if f.name != "evolved"], dict(marker="o", color="tab:blue"), "front member"),
        (
            [f for f in members if f.name == "evolved"],
            dict(marker="*", s=160, color="tab:red"),
            "winner (fitness)",
        ),
        (
            [f for f in view.finals if f.kind == "parent" and f.status == "ok"],
            dict(marker="s", color="tab:gray"),
            "parent",
        ),
    ):
        if group:
            ax.scatter(
                [x.raw(f.metrics) for f in group], [y.raw(f.metrics) for f in group], label=label, **style
            )
    ax.set_xlabel(f"{x.label} ({'max' if x.maximize else 'min'})")
    ax.set_ylabel(f"{y.label} ({'max' if y.maximize else 'min'})")
    ax.set_title("Pareto front, held-out split")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def view_archive(view: ExperimentView):
    """The archive of an m2n2 / map_elites experiment rebuilt from its journal, and its best member per
    task (search split); (None, {}) for the other optimizers."""
    from pydantic import TypeAdapter, ValidationError

    from evomerge.config import OptimizerSpec
    from evomerge.search.archives import of_experiment

    raw = view.config.get("optimizer") or {}
    if raw.get("name") not in ("m2n2", "map_elites"):
        return None, {}
    try:
        spec = TypeAdapter(OptimizerSpec).validate_python(raw)
    except ValidationError:
        return None, {}
    tasks = {t: (m, view.weights.get(t, 1.0)) for t, m in view.tasks.items()}
    items = view.candidate_items([c.id for c in view.ok]) if spec.name == "m2n2" else {}
    return of_experiment(spec, view_objectives(view), tasks, view.candidates, items.__getitem__)


def archive_rows(
    view: ExperimentView, archive, best: dict[str, int]
) -> list[tuple[str, list[str], list[list[str]]]]:
    """Tables of the archive: its best member per task (search value, held-out value where the finals
    scored it), and per MAP-Elites archive its coverage; per M2N2 member its shared fitness."""
    if archive is None:
        return []
    by_id = {c.id: c for c in view.candidates}
    heldout = {f.candidate_id: f for f in view.finals if f.kind == "evolved" and f.status == "ok"}
    tables = []
    rows = []
    for task, cid in best.items():
        final = heldout.get(cid)
        rows.append([
            task, str(cid), _fmt(view.metric(by_id[cid].metrics, task)),
            _fmt(view.metric(final.metrics, task)) if final else "", final.name if final else "",
        ])  # fmt: skip
    tables.append(
        (f"Archive ({archive.kind}; members: {len(archive.members)}): best per task",
         ["task", "candidate", "search value", "held-out value", "held-out final"], rows)
    )  # fmt: skip
    if archive.kind == "map_elites":
        rows = []
        for g in archive.grids:
            top = max(g.cells.values(), key=lambda e: (e[1], -e[0]), default=None)
            rows.append([
                g.quality, " x ".join(g.measures), f"{len(g.cells)}/{int(np.prod(g.dims))} ({g.coverage:.0%})",
                "" if top is None else str(top[0]), "" if top is None else f"{top[1]:.4f}",
            ])  # fmt: skip
        tables.append(
            ("MAP-Elites archives: coverage (search split)",
             ["quality", "behaviour", "cells filled", "best elite", "its quality"], rows)
        )  # fmt: skip
    else:
        shared = archive.shared.sum(axis=1)
        solved = archive.scores > archive.scores.min(axis=0, keepdims=True)
        alone = solved & (solved.sum(axis=0, keepdims=True) == 1)
        order = sorted(range(len(archive.members)), key=lambda i: (-shared[i], archive.members[i]))
        rows = [
            [str(archive.members[i]), _fmt(by_id[archive.members[i]].fitness), f"{shared[i]:.4f}",
             str(int(alone[i].sum())), *(_fmt(view.metric(by_id[archive.members[i]].metrics, t)) for t in view.tasks)]
            for i in order
        ]  # fmt: skip
        tables.append(
            ("M2N2 archive members (search split)",
             ["candidate", "fitness", "shared fitness", "items only it earns", *view.tasks], rows)
        )  # fmt: skip
    return tables


def archive_plot(archive) -> bytes | None:
    """Coverage: each MAP-Elites archive's elites' quality over its behaviour cells (beyond two behaviour
    coordinates, the best over the rest); for M2N2, which search items each member earns."""
    if archive is None:
        return None
    plt = _pyplot()
    if archive.kind == "m2n2":
        fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(archive.members) + 1.6))
        image = ax.imshow(archive.scores - archive.scores.min(axis=0, keepdims=True), aspect="auto",
                          cmap="viridis", interpolation="nearest")  # fmt: skip
        edge = 0
        for _task, ids in archive.layout[:-1]:
            edge += len(ids)
            ax.axvline(edge - 0.5, color="white", lw=1)
        ax.set_yticks(range(len(archive.members)), [str(m) for m in archive.members], fontsize=7)
        ax.set_xlabel("search items (" + " | ".join(t for t, _ in archive.layout) + ")")
        ax.set_ylabel("member (candidate)")
        ax.set_title("M2N2 archive: item values above the archive's lowest")
        fig.colorbar(image, ax=ax)
        return _png(fig)
    grids = archive.grids
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.6), squeeze=False)
    for ax, g in zip(axes[0], grids, strict=True):
        shape = (g.dims + [1])[:2] if len(g.dims) < 2 else g.dims[:2]
        heat = np.full(shape, np.nan)
        for cell, (_, quality) in g.cells.items():
            at = (cell[0], cell[1] if len(cell) > 1 else 0)
            heat[at] = quality if np.isnan(heat[at]) else max(heat[at], quality)
        image = ax.imshow(heat.T, origin="lower", cmap="viridis", aspect="auto",
                          extent=(0, 1, 0, 1), interpolation="nearest")  # fmt: skip
        ax.set_xlabel(g.measures[0])
        ax.set_ylabel(g.measures[1] if len(g.measures) > 1 else "")
        ax.set_title(f"archive of {g.quality}: {g.coverage:.0%} of cells", fontsize=9)
        fig.colorbar(image, ax=ax)
    return _png(fig)


def _bootstrap(diffs: list[np.ndarray], weights: list[float]) -> tuple[float, float]:
    """Percentile 95% interval of sum(weight x mean difference), resampling each task's items (paired)."""
    rng = np.random.default_rng(0)
    total = np.zeros(BOOTSTRAP)
    for diff, weight in zip(diffs, weights, strict=True):
        picks = rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))
        total += weight * diff[picks].mean(axis=1)
    return float(np.percentile(total, 2.5)), float(np.percentile(total, 97.5))


def top_rows(view: ExperimentView, n: int = TOP) -> tuple[list[str], list[list[str]]]:
    """The best candidates: fitness on every search item where they have one, else the estimate (~) the
    search saw, with what it cost."""
    header = ["rank", "candidate", "generation.idx", "search fitness", "scored on", *view.tasks]
    rows = [
        [str(i), str(c.id), f"{c.generation}.{c.idx}", search_fitness(c), _scored_on(c),
         *(task_cell(view, c, t) for t in view.tasks)]
        for i, c in enumerate(view.ranked()[:n], 1)
    ]  # fmt: skip
    return header, rows


def _scored_on(c) -> str:
    if c.item_evals is None:
        return "all items"
    if not c.estimate:
        return f"all items ({c.item_evals})"
    return f"{c.item_evals} item-evals" + (" + full re-score" if c.rescored is not None else "")


def cross_rows(views: list[ExperimentView]) -> tuple[list[str], list[list[str]]]:
    header = [
        "experiment",
        "evaluations",
        "item-evaluations",
        "best search fitness",
        "evolved held-out",
        "best parent held-out",
        "gain",
    ]
    rows = []
    for v in views:
        evolved = next((f for f in v.finals if f.name == "evolved"), None)
        parent = v.best_parent()
        gain = f"{evolved.fitness - parent.fitness:+.4f}" if evolved and parent else ""
        best = v.best
        rows.append([
            v.name, str(len(v.candidates)), f"{v.item_evals:,}" if v.item_evals else "",
            search_fitness(best) if best else "",
            _fmt(evolved.fitness if evolved else None), _fmt(parent.fitness if parent else None), gain,
        ])  # fmt: skip
    return header, rows


# -- writers ----------------------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: html.escape(one_line(s), quote=False).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(one_line(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(one_line(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    thead = f"<thead><tr>{head}</tr></thead>" if any(h for h in header) else ""  # the summary has none
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def csv_text(value: Any) -> Any:
    """A name or reason as a CSV cell that a spreadsheet shows and never runs: a leading =, +, -, @, tab
    or carriage return makes it a formula there, so it gets a leading apostrophe (OWASP's CSV-injection
    advice); the text stays readable. Numbers are left as numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_report(view: ExperimentView, out: Path, cross: list[ExperimentView] | None = None) -> list[Path]:
    """Writes leaderboard.md, fitness.png, recipe.png, report.html and leaderboard.csv into `out`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"report directory {out} exists and is not a directory; choose another --out")
    for name in ("leaderboard.md", "report.html", "leaderboard.csv", "fitness.png", "recipe.png", "front.png",
                 "archive.png"):  # fmt: skip
        if (out / name).is_dir() and not (out / name).is_symlink():  # checked before anything is written
            raise UserError(f"{out / name} is a directory; the report writes a file there: move it aside")
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "fitness.png": fitness_plot(view),
        "recipe.png": recipe_plot(view),
        "front.png": front_plot(view),
    }
    archive, best = view_archive(view)
    plots["archive.png"] = archive_plot(archive)
    written = []
    for name, data in plots.items():
        if data is not None:
            atomic_write(out / name, data)
            written.append(out / name)
    sections = [("Summary", ["", ""], [list(r) for r in summary_rows(view)])]
    if view.finals:
        sections.append(("Held-out split: finalists, parents and default merges", *heldout_rows(view)))
        header, rows = paired_rows(view)
        if rows:
            sections.append(
                ("Held-out split, item by item: the winner against the best parent and default", header, rows)
            )
        header, rows, volume = front_rows(view)
        if rows:
            sections.append((f"Pareto front, held-out split ({volume})", header, rows))
    sections += archive_rows(view, archive, best)
    sections.append((f"Top {TOP} candidates (search split)", *top_rows(view)))
    if view.failures:
        sections.append(
            ("Failed candidates", ["reason", "count"], [[r, str(n)] for r, n in view.failures.most_common()])
        )
    if cross:
        sections.append(("All experiments", *cross_rows(cross)))

    name = one_line(view.name)
    md = [f"# evomerge report: {html.escape(name, quote=False)}", ""]  # Markdown renders raw HTML
    for title, header, rows in sections:
        md += [f"## {title}", "", _md_table(header, rows), ""]
    md += (
        ["## Plots", "", "![fitness](fitness.png)", ""]
        + (["![best recipe](recipe.png)", ""] if plots["recipe.png"] else [])
        + (["![Pareto front](front.png)", ""] if plots["front.png"] else [])
        + (["![archive coverage](archive.png)", ""] if plots["archive.png"] else [])
    )
    atomic_write(out / "leaderboard.md", "\n".join(md).encode())

    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}"></figure>'
        for name, data in plots.items() if data is not None
    )  # fmt: skip
    body = "".join(f"<h2>{html.escape(t)}</h2>{_html_table(h, r)}" for t, h, r in sections)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>evomerge report: {html.escape(name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>evomerge report: {html.escape(name)}</h1>{body}<h2>Plots</h2>{images}</body></html>"
    )
    atomic_write(out / "report.html", page.encode())

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "candidate",
            "generation",
            "idx",
            "status",
            "fitness",
            "fitness_is_estimate",
            "full_split_fitness",
            "item_evals",
            *(csv_text(one_line(t)) for t in view.tasks),
            "merge_seconds",
            "eval_seconds",
            "reason",
        ]
    )
    for c in sorted(view.candidates, key=lambda c: (not c.ok, -c.fitness if c.ok else 0, c.id)):
        writer.writerow([
            c.id, c.generation, c.idx, c.status, c.fitness if c.ok else "", int(c.estimate),
            "" if c.full_fitness is None else c.full_fitness, "" if c.item_evals is None else c.item_evals,
            *(_csv_task(view, c, t) for t in view.tasks), f"{c.merge_seconds:.4f}", f"{c.eval_seconds:.4f}", csv_text(one_line(c.reason or "")),
        ])  # fmt: skip
    atomic_write(out / "leaderboard.csv", buffer.getvalue().encode())
    return written + [out / "leaderboard.md", out / "report.html", out / "leaderboard.csv"]


def _csv_task(view: ExperimentView, c, task: str) -> float | str:
    """A number where the candidate has a score on every search item; an estimate as `~value`, as every
    other view marks it (a spreadsheet keeps it as text, so it is never summed as if it were full)."""
    full, estimate, _ = view.task_scores(c, task)
    if full is not None:
        return full
    return "" if estimate is None else f"~{estimate:.4f}"


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f2f2f2}"
    "figure{display:inline-block;margin:0 1em 1em 0}img{max-width:100%}"
)
