"""Cheap fitness (`evaluation.fidelity`): which items each mode scores, that a subset scores its items as
the whole split does, real searches in every mode (estimates journaled and marked, the best re-scored in
full before the finals), exact resume after kill -9, and bad settings refused before anything is made."""

import sqlite3

import numpy as np
import pytest
import yaml
from helpers import DEVICE, FIDELITY_MODES, REPO, cli, journal, kill_and_resume, smoke

from evomerge.errors import UserError
from evomerge.evaluate.spec import FidelitySpec, TaskSpec
from evomerge.search.fidelity import ItemPlan, k_medoids

MODES = FIDELITY_MODES


def _plan(fidelity, sizes=(40, 40, 30)) -> ItemPlan:
    tasks = [
        TaskSpec(name="a"), TaskSpec(name="a_ll", split_as="a", weight=0.5), TaskSpec(name="b"),
    ]  # fmt: skip
    search = {
        "a": list(range(0, 2 * sizes[0], 2)),
        "a_ll": list(range(0, 2 * sizes[1], 2)),
        "b": list(range(sizes[2])),
    }
    return ItemPlan(FidelitySpec.model_validate(fidelity), tasks, search, split_seed=7)


def test_subsample_is_seeded_per_round_and_shared_by_split_as_tasks():
    plan = _plan({"subsample": {"items": 5}})
    first, again, other = (
        plan.subsample(3),
        _plan({"subsample": {"items": 5}}).subsample(3),
        plan.subsample(4),
    )
    assert first == again  # a function of (split seed, round): every process draws the same
    assert first != other  # a new round, new items
    assert first["a"] == first["a_ll"]  # tasks that share a split share their items
    for name, ids in first.items():
        assert len(ids) == 5 and set(ids) <= set(plan.search[name])
    seen = set()
    for generation in range(40):
        seen |= set(plan.subsample(generation)["b"])
    assert len(seen) > 25  # rounds cover the split rather than one fixed subset


def test_racing_rungs_are_nested_and_end_on_the_whole_split():
    plan = _plan({"racing": {"items": 4, "eta": 2}})
    assert plan.rung_sizes() == [4, 8, 16, 32, 40]
    scored = {name: set() for name in plan.search}
    for rung in range(len(plan.rung_sizes())):
        added = plan.rung_items(2, rung)
        for name, ids in added.items():
            assert not scored[name] & set(ids)  # each rung pays only for the items it adds
            scored[name] |= set(ids)
        assert all(len(scored[n]) == min(plan.rung_sizes()[rung], len(plan.search[n])) for n in scored)
    assert scored == {name: set(ids) for name, ids in plan.search.items()}
    assert plan.rung_items(2, 0)["a"] == plan.first(2, 4)["a"]


def test_anchor_estimate_is_exact_when_clusters_are_pure():
    """Items that every evidence model scores alike form one cluster; an anchor stands for it, so a
    candidate that also scores them alike is estimated exactly."""
    plan = _plan({"anchors": {"items": 2}}, sizes=(40, 40, 30))
    hard = set(range(0, 40, 2))  # half of task a's items: every model gets them wrong
    evidence = []
    for quality in (0.0, 1.0, 1.0):
        evidence.append(
            {
                "a": {i: (0.0 if i in hard else quality) for i in plan.search["a"]},
                "a_ll": {i: -1.0 for i in plan.search["a_ll"]},
                "b": {i: quality for i in plan.search["b"]},
            }
        )
    anchors = plan.choose_anchors(evidence, version=0)
    assert anchors == plan.choose_anchors(evidence, version=0)  # deterministic
    assert sorted(anchors.weights["a"].values()) == [20.0, 20.0]
    candidate = {
        "a": {i: (0.0 if i in hard else 1.0) for i in plan.search["a"]},
        "a_ll": {i: -1.0 for i in plan.search["a_ll"]},
        "b": {i: 1.0 for i in plan.search["b"]},
    }
    fitness, metrics = plan.anchor_estimate(anchors, candidate)
    assert metrics == {"a": 0.5, "a_ll": -1.0, "b": 1.0}
    assert fitness == pytest.approx(0.5 - 0.5 + 1.0)


def test_k_medoids_covers_every_item_once():
    features = np.random.default_rng(0).random((120, 4))
    medoids, sizes = k_medoids(features, 9, seed=3)
    assert len(set(medoids)) == 9 and sum(sizes) == 120
    assert (medoids, sizes) == k_medoids(features, 9, seed=3)


@pytest.mark.parametrize(
    "value, message",
    [
        ("subsample", "subsample needs a size"),
        ({"subsample": {"items": 0}}, "greater than or equal to 1"),
        ({"subsample": {"items": 3}, "rescore_top": 0}, "greater than or equal to 1"),
        ({"subsample": {"items": 3}, "racing": None}, "name one mode"),
        ({"anchors": {"items": 3, "eta": 2}}, "unknown option 'eta'"),
        ({"full": {"items": 3}}, "full takes no options"),
    ],
)
def test_fidelity_spelling_errors(value, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        FidelitySpec.model_validate(value)
    assert message in str(err.value)


def test_a_subset_scores_its_items_as_the_whole_split_does():
    """Scoring some search items gives each item the value it has when the whole search split is scored
    (same prompt, same few-shot context), and the metric is their mean."""
    from evomerge.config import load_config
    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.run import load_model_and_tokenizer

    config, config_dir = load_config(REPO / "configs" / "demo.yaml")
    model, tok = load_model_and_tokenizer(str(REPO / "zoo" / "math-en"), device=DEVICE, dtype="float32")
    spec = config.evaluation.model_copy(
        update={"tasks": [t.model_copy(update={"limit": 40}) for t in config.evaluation.tasks]}
    )
    evaluator = Evaluator(model, tok, spec)
    whole = evaluator.evaluate("search")
    some = {name: whole.items[name]["ids"][3:40:4] for name in whole.items}
    part = evaluator.evaluate("search", some)
    assert part.ok and sum(part.examples.values()) == 20
    for name, data in part.items.items():
        full = dict(zip(whole.items[name]["ids"], whole.items[name]["values"], strict=True))
        assert data["ids"] == sorted(some[name])
        np.testing.assert_allclose(data["values"], [full[i] for i in data["ids"]], rtol=1e-5, atol=1e-6)
        key = data["metric"]
        assert part.metrics[name][key] == pytest.approx(np.mean(data["values"]))


# -- real searches ----------------------------------------------------------------------------------


def _scores(exp):
    db = sqlite3.connect(exp / "experiment.sqlite")
    try:
        return db.execute("SELECT owner, status, fitness, item_evals FROM scores ORDER BY owner").fetchall()
    finally:
        db.close()


def _rows(exp):
    db = sqlite3.connect(exp / "experiment.sqlite")
    try:
        return db.execute(
            "SELECT id, generation, idx, status, fitness, fidelity, recipe FROM candidates ORDER BY id"
        ).fetchall()
    finally:
        db.close()


@pytest.fixture(scope="module", params=list(MODES))
def mode_run(request, fidelity_runs):
    return (request.param, *fidelity_runs(request.param))


def test_cheap_search_journals_estimates_and_rescores_the_best(mode_run):
    import json

    mode, cfg, exp, done = mode_run
    rows, scores = _rows(exp), _scores(exp)
    assert len(rows) == 24
    full_cost = 24  # smoke: one task, limit 24 search items
    fidelity = {r[0]: json.loads(r[5]) for r in rows}
    estimates = [i for i, f in fidelity.items() if not f["full"]]
    assert estimates, "a cheap mode scores most candidates on part of the split"
    assert all(fidelity[i]["items"] < full_cost for i in estimates)
    place = {f"{r[1]}.{r[2]}": r[0] for r in rows}  # re-scores are named by place in the run
    rescored = {place[o.split(":")[1]]: fit for o, status, fit, _ in scores if o.startswith("rescore:")}
    # the 5 best estimates all end with a fitness on every search item
    ok = sorted((r for r in rows if r[3] == "ok"), key=lambda r: (-r[4], r[1], r[2]))[:5]
    assert all(r[0] in rescored or fidelity[r[0]]["full"] for r in ok)
    assert all(items == full_cost for o, _, _, items in scores if o.startswith("rescore:"))
    # the finals score the best full-split fitness, not the best estimate (ties: the earlier candidate)
    full = {r[0]: r[4] for r in rows if r[3] == "ok" and fidelity[r[0]]["full"]} | rescored
    order = {r[0]: (r[1], r[2]) for r in rows}
    winner = min(full, key=lambda i: (-full[i], order[i]))
    db = sqlite3.connect(exp / "experiment.sqlite")
    assert db.execute("SELECT candidate_id FROM finals WHERE kind='evolved'").fetchone()[0] == winner
    db.close()
    if mode == "anchors":
        assert sum(o.startswith("prior:") for o, *_ in scores) == 5  # 2 parents, 3 default merges
    if mode == "racing":
        assert any(f.get("rung", 0) > 0 for f in fidelity.values())
        assert any(o.startswith("rung:") for o, *_ in scores)
    report = cli("report", exp, "--out", exp.parent / "report")
    assert report.returncode == 0, report.stderr
    text = (exp.parent / "report" / "leaderboard.md").read_text()
    assert (
        f"| fitness | {mode}: " in text and "item-evaluations" in text and "x fewer than full fitness" in text
    )
    assert "(estimate ~" in text or "~" in text


@pytest.mark.parametrize("mode_run", ["racing"], indirect=True)
def test_racing_candidate_through_every_rung_scores_as_full(tmp_path, mode_run):
    """A racer that reaches the last rung has been scored on every search item, in parts: its fitness is
    the full-split fitness (the same number a full-fidelity search journals for the same recipe)."""
    import json

    _, _, exp, _ = mode_run
    full_exp = tmp_path / "full"
    done = cli("search", smoke(tmp_path), "--out", full_exp, "--budget", 6)
    assert done.returncode == 0, done.stderr
    plain = {(r[1], r[2]): r[4] for r in _rows(full_exp)}
    finishers = [r for r in _rows(exp) if r[1] == 0 and json.loads(r[5])["full"]]
    assert finishers
    for r in finishers:  # round 0 is the same in both runs (nothing told yet)
        assert r[4] == pytest.approx(plain[(0, r[2])], abs=1e-9)


@pytest.mark.slow
def test_raised_budget_finishes_a_race_cut_short(tmp_path):
    """A budget that ends inside a round races only the candidates within it; raising the budget adds
    racers to that round, and the search still journals every candidate and scores the finalists."""
    cfg = smoke(tmp_path, **{"evaluation.fidelity": MODES["racing"]})
    first = cli("search", cfg, "--budget", 20)  # rounds of 6: the last round holds 2 racers
    assert first.returncode == 0, first.stderr
    again = cli("search", cfg, "--budget", 24)
    assert again.returncode == 0, again.stderr
    rows = _rows(tmp_path / "exp")
    assert len(rows) == 24 and {(r[1], r[2]) for r in rows} == {(g, i) for g in range(4) for i in range(6)}
    db = sqlite3.connect(tmp_path / "exp" / "experiment.sqlite")
    assert db.execute("SELECT COUNT(*) FROM finals WHERE kind='evolved'").fetchone()[0] == 1
    db.close()


@pytest.mark.slow
def test_killed_and_resumed_ends_like_uninterrupted_in_every_mode(mode_run, tmp_path):
    mode, cfg, exp, _ = mode_run
    out = tmp_path / "killed"
    killed_at = kill_and_resume(cfg, out, budget=24, seed=99, kills=2)
    assert len(killed_at) >= 3 and any(0 < n < 24 for n, _ in killed_at), killed_at
    assert journal(out) == journal(exp)
    assert [s[:3] for s in _scores(out)] == [s[:3] for s in _scores(exp)]


# -- bad settings --------------------------------------------------------------------------------------


AGGREGATE_TASK = """
task: zoo_math_x_median
include: {base}
metric_list:
  - metric: exact_match
    aggregation: median
    higher_is_better: true
"""


@pytest.mark.parametrize(
    "fidelity, extra, message",
    [
        (
            {"subsample": {"items": 25}},
            {},
            "subsample items 25 is more than the search split of zoo_math_x (24 items)",
        ),
        ({"racing": {"items": 30}}, {}, "racing items 30 is more than the search split"),
        (
            {"subsample": {"items": 0}},
            {},
            "evaluation.fidelity.items: Input should be greater than or equal to 1",
        ),
        (
            {"subsample": {"items": 4}, "rescore_top": 0},
            {},
            "evaluation.fidelity.rescore_top: Input should be greater",
        ),
        (
            {"anchors": {"items": 4}},
            {"median": True},
            "anchors adds up per-item results, but task zoo_math_x_median",
        ),
    ],
)
def test_bad_fidelity_is_one_line_and_creates_nothing(tmp_path, fidelity, extra, message):
    changes = {"evaluation.fidelity": fidelity}
    if extra.get("median"):
        tasks_dir = tmp_path / "tasks"
        tasks_dir.mkdir()
        base = REPO / "evomerge" / "tasks" / "zoo" / "zoo_math_x.yaml"
        (tasks_dir / "zoo_math_x_median.yaml").write_text(AGGREGATE_TASK.format(base=base))
        changes["evaluation.tasks"] = [{"name": "zoo_math_x_median", "limit": 24}]
        changes["evaluation.include_paths"] = [str(tasks_dir)]
    cfg = smoke(tmp_path, **changes)
    commands = ("validate", "search") if "median" in extra or "25" in message else ("search",)
    for command in commands:  # validate runs the same checks (check_config): two cases show it
        done = cli(command, cfg)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "exp").exists()


def test_full_fidelity_keeps_older_experiments_resumable():
    """An experiment made before fidelity modes had no such key: full fitness must not look like a change."""
    from evomerge.config import parse_config

    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    plain = parse_config(cfg).identity()
    assert "fidelity" not in plain["evaluation"]
    cfg["evaluation"]["fidelity"] = {"subsample": {"items": 3}}
    assert parse_config(cfg).identity()["evaluation"]["fidelity"]["mode"] == "subsample"
    with pytest.raises(UserError):
        parse_config({**cfg, "evaluation": {**cfg["evaluation"], "fidelity": "cheap"}})
