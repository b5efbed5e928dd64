"""Objectives, Pareto fronts and hypervolume (issue 26), with Optuna's own hypervolume as the oracle."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import DEVICE, MULTI_OPTIMIZERS, cli, journal
from helpers import pareto as _pareto

from evomerge.search.objectives import Objective, dominates, hypervolume, pareto_front, vector


@pytest.mark.parametrize("dims", [1, 2, 3, 4])
def test_hypervolume_equals_optunas(dims):
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(dims)
    for _ in range(5):
        reference = rng.uniform(-1.5, -0.5, dims)
        points = reference + rng.uniform(0, 2, (25, dims))  # optuna takes only points that dominate it
        ours = hypervolume(points.tolist(), reference.tolist())
        # optuna minimises: negate both
        assert ours == pytest.approx(compute_hypervolume(-points, -reference), rel=1e-12)
        assert ours > 0


def test_hypervolume_ignores_points_that_do_not_dominate_the_reference():
    assert hypervolume([(0.5, 0.5)], (0.0, 0.0)) == pytest.approx(0.25)
    assert hypervolume([(0.5, 0.5), (-0.1, 2.0)], (0.0, 0.0)) == pytest.approx(0.25)
    assert hypervolume([], (0.0, 0.0)) == 0.0


def test_pareto_front_keeps_the_non_dominated_and_skips_failures():
    points = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.4, 0.4), (1.0, 0.0), (float("-inf"), 9.0)]
    assert pareto_front(points) == [0, 1, 2, 4]
    assert dominates((1, 1), (1, 0)) and not dominates((1, 0), (1, 0)) and not dominates((1, 0), (0, 1))


def test_objective_vectors_are_signed_so_higher_is_better():
    metrics = {"a": {"acc,none": 0.7}, "g": {"exact_match,strict-match": 0.4, "generation_length,none": 12.0}}
    objectives = [
        Objective("a", "a", None, True),
        Objective("g", "g", "exact_match,strict-match", True),
        Objective("length g", "g", "generation_length,none", False),
    ]
    assert vector(objectives, metrics) == (0.7, 0.4, -12.0)
    assert np.isnan(Objective("x", "missing", None, True).raw(metrics))


# -- the multi-objective search, end to end (real Optuna, real lm-eval, the zoo) ------------------------------

ZOO = Path(__file__).resolve().parent.parent / "zoo"
TASKS = Path(__file__).resolve().parent.parent / "evomerge" / "tasks" / "zoo"


def test_nsga2_is_told_the_objective_vectors_and_resumes_exactly(tmp_path):
    """A run extended with --budget replays the journal through a new NSGA-II study and asks exactly the
    candidates of the uninterrupted run; each candidate's objectives are its journaled task metrics."""
    whole = _pareto(tmp_path, "whole", **{"optimizer.budget": 18})
    assert cli("search", whole).returncode == 0
    parts = _pareto(tmp_path, "parts", **{"optimizer.budget": 6})
    assert cli("search", parts).returncode == 0
    done = cli("search", parts, "--budget", 18)
    assert done.returncode == 0, done.stderr
    a, _ = journal(tmp_path / "whole")
    b, _ = journal(tmp_path / "parts")
    assert len(a) == len(b) == 18
    assert [x[2] for x in a] == [y[2] for y in b]  # the same genomes, to the last digit
    db = sqlite3.connect(tmp_path / "whole" / "experiment.sqlite")
    metrics = [json.loads(m) for (m,) in db.execute("SELECT metrics FROM candidates WHERE status='ok'")]
    points = [
        (m["zoo_math_x"]["exact_match,strict-match"], m["zoo_math_en"]["exact_match,strict-match"])
        for m in metrics
    ]
    assert len(set(points)) > 1  # the objectives move: a front to find
    # the finals score the search's front on held-out: every non-dominated objective vector once
    rows = db.execute("SELECT id, fitness, metrics FROM candidates WHERE status='ok'").fetchall()
    vectors = [
        (
            json.loads(m)["zoo_math_x"]["exact_match,strict-match"],
            json.loads(m)["zoo_math_en"]["exact_match,strict-match"],
        )
        for _, _, m in rows
    ]
    front = {vectors[i] for i in pareto_front(vectors)}
    finals = {
        name: cid for name, cid in db.execute("SELECT name, candidate_id FROM finals WHERE kind='evolved'")
    }
    by_id = {r[0]: v for r, v in zip(rows, vectors, strict=True)}
    assert {by_id[cid] for cid in finals.values()} == front  # one member per vector, the winner among them
    assert all(name == "evolved" or name == f"front candidate {cid}" for name, cid in finals.items())
    report = cli("report", tmp_path / "whole", "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert "hypervolume of the held-out front" in report.stdout
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "## Pareto front, held-out split (hypervolume of the held-out front: " in md
    assert (tmp_path / "report" / "front.png").stat().st_size > 0
    # any front member exports by its id, with its held-out scores on the card
    member = max(finals.values(), key=lambda cid: by_id[cid][1])  # the one best at keeping math_en
    done = cli("export", tmp_path / "whole", tmp_path / "member", "--candidate", member)
    assert done.returncode == 0, done.stderr
    assert f"exported candidate {member} " in done.stdout
    card = (tmp_path / "member" / "README.md").read_text()
    assert card.startswith(f"# smoke-pareto: evolved merge (candidate {member}, rank ")
    assert (tmp_path / "member" / "mergekit_config.yml").stat().st_size > 0
    missing = cli("export", tmp_path / "whole", tmp_path / "none", "--candidate", 9999)
    assert missing.returncode == 2 and "--candidate 9999" in missing.stderr


def test_optuna_nsga2_improves_a_two_objective_front():
    """The adapter on a known problem (maximise -(x-0.2)^2 and -(x-0.8)^2 summed over genes): the front of
    the last generations dominates more volume than the first generation's."""
    from evomerge.config import OptunaSpec
    from evomerge.search.optimizers import Feedback, make_optimizer

    spec = OptunaSpec(name="optuna", sampler="nsga2", budget=200, seed=3, batch=10)
    opt = make_optimizer(spec, np.full(4, 0.5), 10, 0, objectives=2)
    points = []
    for _ in range(10):
        genomes = opt.ask(opt.batch)
        vectors = [(-float(np.sum((g - 0.2) ** 2)), -float(np.sum((g - 0.8) ** 2))) for g in genomes]
        opt.tell(genomes, [Feedback(0.0, v) for v in vectors])
        points.append(vectors)
    reference = (-3.0, -3.0)
    first = hypervolume(points[0], reference)
    last = hypervolume([p for gen in points[-3:] for p in gen], reference)
    assert last > first * 1.1


def test_a_stated_reference_point_sets_the_hypervolume(tmp_path):
    objectives = [{"task": "zoo_math_x", "reference": -1.0}, {"task": "zoo_math_en", "reference": -1.0}]
    path = _pareto(tmp_path, objectives=objectives, **{"optimizer.budget": 6})
    assert cli("search", path).returncode == 0
    report = cli("report", tmp_path / "exp", "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    line = next(x for x in report.stdout.splitlines() if x.startswith("hypervolume of the held-out front"))
    assert "(reference point: zoo_math_x -1, zoo_math_en -1)" in line
    assert float(line.split(": ")[1].split()[0]) >= 1.0  # every member is at least 1 past (-1, -1) in both


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"objectives": [{"task": "zoo_math_x", "reference": "low"}]}, "objectives"),
        (
            {"objectives": [{"task": "zoo_nope"}]},
            "objectives[0].task: 'zoo_nope' is not one of evaluation.tasks",
        ),
        ({"objectives": [{"task": "zoo_math_x", "direction": "up"}]}, "objectives"),
        ({"objectives": [{"task": "zoo_math_x", "weight": 2}]}, "objectives"),
        ({"objectives": [{"task": "zoo_math_x"}, {"task": "zoo_math_x"}]}, "listed twice"),
        ({"objectives": [{}]}, "an objective names a task"),
        ({"evaluation.fidelity": {"racing": {"items": 3}}}, "ranks candidates by one fitness"),
        ({"optimizer.sampler": "cmaes"}, "optimises one objective"),
        ({"optimizer.overlap": 2}, "overlap"),
        ({"optimizer.sampler": "nsga3"}, "optimizer"),
        (
            {
                "objectives": [{"generation_length": "zoo_verbs_x"}],
                "evaluation.tasks": [{"name": "zoo_math_x", "limit": 8}, {"name": "zoo_verbs_x", "limit": 8}],
            },
            "generation_length needs a generation task; zoo_verbs_x is multiple_choice",
        ),
        ({"objectives": [{"generation_length": "zoo_math_x", "metric": "acc"}]}, "metric"),
    ],
)
def test_bad_objectives_are_one_line_and_create_nothing(tmp_path, changes, needle):
    path = _pareto(tmp_path, **changes)
    done = cli("search", path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "exp").exists()


def test_generation_length_is_each_answers_tokens(tmp_path):
    """`generation_length: TASK` is the mean number of tokens the candidate generated per item, journaled
    per item beside the task's metric; a shorter answer is better by default."""
    from evomerge.evaluate import EvaluationSpec, Evaluator
    from evomerge.evaluate.run import load_model_and_tokenizer

    path = _pareto(tmp_path, **{"objectives": [{"task": "zoo_math_x"}, {"generation_length": "zoo_math_x"}],
                                "optimizer.budget": 6})  # fmt: skip
    done = cli("search", path)
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    metrics = [json.loads(m) for (m,) in db.execute("SELECT metrics FROM candidates WHERE status='ok'")]
    assert metrics and all(m["zoo_math_x"]["generation_length,none"] > 0 for m in metrics)
    # the oracle: math-en's answers decoded independently, their tokens counted
    model, tok = load_model_and_tokenizer(str(ZOO / "math-en"), device=DEVICE, dtype="float32")
    spec = EvaluationSpec.model_validate(
        {"tasks": [{"name": "zoo_math_x", "limit": 8}], "split": {"heldout": 8}}
    )
    result = Evaluator(model, tok, spec, lengths=frozenset({"zoo_math_x"})).evaluate("search")
    rows = [json.loads(line) for line in (TASKS / "zoo_math_x.jsonl").read_text().splitlines()]
    evaluator = Evaluator(model, tok, spec)
    counts = []
    for i in evaluator.indices("zoo_math_x", "search"):
        ids = tok(rows[i]["question"], return_tensors="pt").input_ids.to(model.device)
        out = model.generate(
            ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0
        )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        counts.append(len(tok(text, add_special_tokens=False).input_ids))
    assert result.items["zoo_math_x"]["ids"]
    assert result.metrics["zoo_math_x"]["generation_length,none"] == pytest.approx(np.mean(counts))
    assert "generation_length" not in json.dumps(evaluator.evaluate("search").metrics)  # only when asked


# -- M2N2 --------------------------------------------------------------------------------------------------


def _told(values_by_task):
    from evomerge.search.optimizers import Feedback
    from evomerge.store import ItemResults

    items = {
        t: ItemResults("acc,none", np.arange(len(v)), np.asarray(v, dtype=float))
        for t, v in values_by_task.items()
    }
    return Feedback(0.0, (0.0,), lambda: items)


def _resumed_equals_whole(tmp_path, optimizer: dict, **changes) -> None:
    """A run of 4 candidates extended with --budget 12 asks exactly the 12 of an uninterrupted run."""
    whole = _pareto(tmp_path, "whole", optimizer={**optimizer, "budget": 12}, **changes)
    assert cli("search", whole).returncode == 0
    parts = _pareto(tmp_path, "parts", optimizer={**optimizer, "budget": 4}, **changes)
    assert cli("search", parts).returncode == 0
    done = cli("search", parts, "--budget", 12)
    assert done.returncode == 0, done.stderr
    a, _ = journal(tmp_path / "whole")
    b, _ = journal(tmp_path / "parts")
    assert len(a) == 12 and [x[2] for x in a] == [y[2] for y in b]


@pytest.mark.parametrize(("alpha", "survivor"), [(1.0, "specialist"), (0.0, "child")])
def test_m2n2_shares_each_item_among_the_members_that_solve_it(alpha, survivor):
    """Archive of two: a generalist (items 0-3) and a specialist (items 4-5, which nobody else solves).
    A child solving items 0-2 adds nothing new: with competition (alpha 1) it is the worst and is dropped;
    without (alpha 0) it outscores the specialist (3 items to 2) and replaces it."""
    from evomerge.config import M2n2Spec
    from evomerge.search.optimizers import make_optimizer

    spec = M2n2Spec(name="m2n2", archive_size=2, alpha=alpha, seed=0, budget=10)
    opt = make_optimizer(spec, np.full(3, 0.5), 3, seeds=[np.zeros(3), np.ones(3)])
    generalist, specialist, child = np.zeros(3), np.ones(3), np.full(3, 0.25)
    opt.tell([generalist, specialist], [_told({"t": [1, 1, 1, 1, 0, 0]}), _told({"t": [0, 0, 0, 0, 1, 1]})])
    opt.tell([child], [_told({"t": [1, 1, 1, 0, 0, 0]})])
    kept = {tuple(g) for g in opt.genomes}
    assert tuple(generalist) in kept
    assert (tuple(specialist) in kept) == (survivor == "specialist")
    assert (tuple(child) in kept) == (survivor == "child")


def test_m2n2_starts_from_the_sources_and_mixes_parents_at_a_split_point():
    from evomerge.config import M2n2Spec
    from evomerge.search.optimizers import make_optimizer

    spec = M2n2Spec(name="m2n2", archive_size=4, mutation=0.0, seed=1, budget=10)
    seeds = [np.zeros(6), np.ones(6)]
    opt = make_optimizer(spec, np.full(6, 0.5), 2, seeds=seeds)
    first = opt.ask(2)
    assert [list(g) for g in first] == [list(s) for s in seeds]
    opt.tell(first, [_told({"t": [1, 0]}), _told({"t": [0, 1]})])
    for child in opt.ask(20):
        # each gene is w or 1 - w of the second parent: one value left of the split, its mirror right of it
        values = sorted(set(np.round(child, 12)))
        assert len(values) <= 2 and (len(values) == 1 or values[0] + values[1] == pytest.approx(1.0))


def test_m2n2_search_resumes_exactly_and_its_first_round_is_the_sources(tmp_path):
    _resumed_equals_whole(
        tmp_path, {"name": "m2n2", "seed": 0, "batch": 4, "archive_size": 4}, objectives=None
    )
    db = sqlite3.connect(tmp_path / "whole" / "experiment.sqlite")
    recipes = [json.loads(r) for (r,) in db.execute("SELECT recipe FROM candidates ORDER BY generation, idx")]
    embed = [r["groups"]["embed"]["weight"] for r in recipes[:3]]
    assert embed[:2] == [[1.0, 0.0], [0.0, 1.0]]  # math-en alone, lang-x alone, then the default merge
    _archive_is_reported(tmp_path, "M2N2 archive members (search split)")


def _archive_is_reported(tmp_path, table: str) -> None:
    """The finals score the archive's best member per task on held-out, and the report shows the archive
    (its best per task with those held-out values, its own table, a coverage heat map)."""
    from evomerge.report.render import view_archive
    from evomerge.results import ExperimentView

    view = ExperimentView.load(tmp_path / "whole")
    archive, best = view_archive(view)
    assert archive is not None and set(best) == {"zoo_math_x", "zoo_math_en"}
    assert set(best.values()) <= set(archive.members)
    scored = {f.candidate_id for f in view.finals if f.kind == "evolved" and f.status == "ok"}
    assert set(best.values()) <= scored  # every archive best has its held-out score
    done = cli("report", tmp_path / "whole", "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    assert "best per task" in done.stdout
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert f"## {table}" in md and "): best per task" in md
    assert (tmp_path / "report" / "archive.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("optimizer", "fidelity", "needle"),
    [
        ({"name": "m2n2", "archive_size": 1}, None, "archive_size"),
        ({"name": "m2n2"}, {"subsample": {"items": 4}}, "m2n2 compares archive members item by item"),
        ({"name": "m2n2", "alpha": -1}, None, "alpha"),
    ],
)
def test_bad_m2n2_settings_are_one_line(tmp_path, optimizer, fidelity, needle):
    changes = {"optimizer": {"budget": 12, **optimizer}, "objectives": None}
    if fidelity:
        changes["evaluation.fidelity"] = fidelity
    done = cli("search", _pareto(tmp_path, **changes))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "exp").exists()


# -- MAP-Elites, CycleQD-style (pyribs) --------------------------------------------------------------------


def test_map_elites_keeps_one_archive_per_objective_over_the_others():
    """Two objectives that pull apart (near 0.2 vs near 0.8 in every gene): the archive of the first keeps
    elites across the second's range, the quality cycles between the archives, failures enter no cell."""
    from evomerge.config import MapElitesSpec
    from evomerge.search.optimizers import Feedback, make_optimizer

    spec = MapElitesSpec(name="map_elites", cells=5, seed=0, budget=400, batch=8)
    opt = make_optimizer(spec, np.full(3, 0.5), 8, objectives=2)
    for _ in range(12):
        genomes = opt.ask(opt.batch)
        told = [
            Feedback(0.0, (1 - float(np.mean((x - 0.2) ** 2)) * 4, 1 - float(np.mean((x - 0.8) ** 2)) * 4))
            for x in genomes
        ]
        told[0] = Feedback(1e9, ())  # a failed candidate
        opt.tell(genomes, told)
    first, second = opt.elites(0), opt.elites(1)
    assert len(first) >= 3 and len(second) >= 3  # several cells: diverse elites, not one winner
    assert all(q > -1e8 for _, q, _ in first + second)
    best_first = max(first, key=lambda e: e[1])[0]
    best_second = max(second, key=lambda e: e[1])[0]
    assert np.mean(best_first) < np.mean(best_second)  # each archive's best leans to its own objective
    assert opt.round == 12


def test_map_elites_search_resumes_exactly(tmp_path):
    _resumed_equals_whole(tmp_path, {"name": "map_elites", "seed": 0, "batch": 4, "cells": 4})
    _archive_is_reported(tmp_path, "MAP-Elites archives: coverage (search split)")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"objectives": [{"task": "zoo_math_x"}]}, "at least two objectives"),
        ({"objectives": [{"task": "zoo_math_x"}, {"generation_length": "zoo_math_x"}]}, "no fixed range"),
        ({"evaluation.fidelity": {"subsample": {"items": 4}}}, "map_elites places every candidate"),
        ({"optimizer.cells": 1}, "cells"),
    ],
)
def test_bad_map_elites_settings_are_one_line(tmp_path, changes, needle):
    changes = {"optimizer": {"name": "map_elites", "budget": 12}, **changes}
    if "optimizer.cells" in changes:
        changes["optimizer"]["cells"] = changes.pop("optimizer.cells")
    done = cli("search", _pareto(tmp_path, **changes))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert not (tmp_path / "exp").exists()


def test_m2n2_starts_with_methods_whose_default_merge_leaves_a_gene_unset(tmp_path):
    """breadcrumbs_ties' default merge sets no gamma: its genome cannot be encoded, so the archive starts
    from the sources alone (it used to crash every search, m2n2 or not, while building the seeds)."""
    m2n2 = {"name": "m2n2", "budget": 4, "seed": 0, "batch": 4, "archive_size": 4}
    path = _pareto(tmp_path, optimizer=m2n2, objectives=None, merge={"method": "breadcrumbs_ties"})
    done = cli("search", path)
    assert done.returncode == 0, done.stderr


# -- archives rebuilt from the journal (report, finals) ------------------------------------------------


class _Journaled:
    """A journaled candidate as the archive rebuild reads it (id, place, status, metrics)."""

    def __init__(self, cid, generation, idx, metrics):
        self.id, self.generation, self.idx, self.metrics, self.ok = cid, generation, idx, metrics, True


def test_rebuilt_archives_equal_the_searchs_own():
    """Offering the journal in told order rebuilds exactly the archive the optimizer held: MAP-Elites'
    elites per cell and M2N2's members (the report and the finals read archives this way)."""
    from evomerge.config import M2n2Spec, MapElitesSpec
    from evomerge.search.archives import rebuild
    from evomerge.search.optimizers import Feedback, make_optimizer

    objectives = [Objective("a", "a", "m", True), Objective("b", "b", "m", True)]
    spec = MapElitesSpec(name="map_elites", cells=4, seed=3, budget=80, batch=8)
    opt = make_optimizer(spec, np.full(3, 0.5), 8, objectives=2)
    journaled, genomes = [], {}
    for g in range(8):
        asked = opt.ask(opt.batch)
        told = []
        for i, x in enumerate(asked):
            v = (1 - float(np.mean((x - 0.2) ** 2)) * 4, 1 - float(np.mean((x - 0.9) ** 2)) * 3)
            told.append(Feedback(0.0, v))
            journaled.append(_Journaled(100 + len(journaled), g, i, {"a": {"m": v[0]}, "b": {"m": v[1]}}))
            genomes[journaled[-1].id] = x
        opt.tell(asked, told)
    archive = rebuild(spec, objectives, {}, journaled[::-1], lambda cid: {})  # any order in, told order used
    for k, grid in enumerate(archive.grids):
        elites = opt.elites(k)
        assert len(grid.cells) == len(elites) >= 2
        held = sorted((round(q, 12), tuple(np.round(x, 12))) for x, q, _ in elites)
        rebuilt = sorted((round(q, 12), tuple(np.round(genomes[cid], 12))) for cid, q in grid.cells.values())
        assert held == rebuilt
        assert grid.coverage == len(elites) / 4

    m2 = M2n2Spec(name="m2n2", archive_size=3, alpha=1.0, seed=0, budget=30, batch=4)
    opt = make_optimizer(m2, np.full(4, 0.5), 4, weights={"t": 2.0})
    rng = np.random.default_rng(0)
    journaled, items, genomes = [], {}, {}
    for g in range(5):
        asked = opt.ask(opt.batch)
        told = []
        for i, x in enumerate(asked):
            values = {"t": list((rng.uniform(size=6) < x.mean()).astype(float))}
            told.append(_told(values))
            cid = len(journaled)
            journaled.append(_Journaled(cid, g, i, {}))
            items[cid], genomes[cid] = told[-1].items(), x
        opt.tell(asked, told)
    archive = rebuild(m2, [], {"t": 2.0}, journaled, items.__getitem__)
    assert [tuple(genomes[c]) for c in archive.members] == [tuple(x) for x in opt.genomes]
    assert archive.layout == [("t", list(range(6)))] and archive.scores.max() == 2.0  # the task's weight


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(MULTI_OPTIMIZERS.values()), ids=list(MULTI_OPTIMIZERS))
def test_killed_and_resumed_ends_like_uninterrupted(tmp_path, optimizer):
    """kill -9 the real command at random moments, resume each time: the same candidates, front and
    archive finals as the uninterrupted run."""
    from helpers import kill_and_resume

    spec = {**optimizer, "budget": 12, "seed": 0}
    whole = _pareto(tmp_path, "whole", optimizer=spec)
    assert cli("search", whole).returncode == 0
    killed = _pareto(tmp_path, "killed", optimizer=spec)
    killed_at = kill_and_resume(killed, tmp_path / "killed", budget=12, seed=7, kills=2)
    assert any(0 < n < 12 for n, _ in killed_at), killed_at
    assert journal(tmp_path / "killed") == journal(tmp_path / "whole")
