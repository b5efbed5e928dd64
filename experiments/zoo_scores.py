"""Score the zoo and its default merges on every bundled task with the evaluator (held-out split).

    python experiments/zoo_scores.py

Parents are scored as they are; merges are written in memory into one resident model by the merge engine
(the search's inner loop, without the search). The last row is the data-flow ablation the README cites:
math-en's own eight layers, unscaled, under lang-x's embeddings (a layer path whose only change is its
embeddings end). Prints a markdown table for the README.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from evomerge.evaluate import EvaluationSpec, Evaluator  # noqa: E402
from evomerge.evaluate.run import load_model_and_tokenizer  # noqa: E402
from evomerge.merge.dfs import path_model  # noqa: E402
from evomerge.merge.engine import MergeEngine  # noqa: E402
from evomerge.merge.methods import Method  # noqa: E402
from evomerge.merge.recipe import Recipe  # noqa: E402
from evomerge.models.checkpoint import Checkpoint  # noqa: E402

ZOO = Path(__file__).resolve().parent.parent / "zoo"
TASKS = {
    "zoo_math_en": "exact_match,strict-match",
    "zoo_math_x": "exact_match,strict-match",
    "zoo_verbs_x": "acc,none",
    "zoo_compare_en": "acc,none",
    "zoo_compare_x": "acc,none",
}
MODELS = ("base", "math-en", "lang-x", "compare-en")
MERGES = [  # (label, method, weights, densities), over the three fine-tunes
    ("task_arithmetic (w 1)", Method.task_arithmetic, [1.0] * 3, []),
    ("ties (w 1; density 0.5)", Method.ties, [1.0] * 3, [0.5] * 3),
    ("dare_ties (w 1; density 0.5)", Method.dare_ties, [1.0] * 3, [0.5] * 3),
]


def main() -> None:
    spec = EvaluationSpec.model_validate(
        {"tasks": [{"name": t, "metric": m} for t, m in TASKS.items()], "split": {"heldout": 300, "seed": 0}}
    )
    model, tok = load_model_and_tokenizer(str(ZOO / "base"), device="cpu", dtype="float32")
    evaluator = Evaluator(model, tok, spec)
    rows = []
    for name in MODELS:
        other, _ = load_model_and_tokenizer(str(ZOO / name), device="cpu", dtype="float32")
        model.load_state_dict(other.state_dict())
        rows.append((name, evaluator.evaluate("heldout")))
    base, *tunes = (Checkpoint.open(ZOO / n) for n in MODELS)
    for label, method, weights, densities in MERGES:
        engine = MergeEngine(base, tunes, method, model, dtype=torch.float32)
        engine.apply(
            Recipe.uniform(method, engine.family.group_names(engine.num_layers), weights, densities, seed=0)
        )
        rows.append((label, evaluator.evaluate("heldout")))
    math_en, lang_x = (
        load_model_and_tokenizer(str(ZOO / n), device="cpu", dtype="float32")[0] for n in MODELS[1:3]
    )
    own_layers = [(0, i) for i in range(len(math_en.model.layers))]
    evaluator.set_model(path_model([math_en, lang_x], own_layers, ends=(1, 0)))
    rows.append(("math-en under lang-x's embeddings (path, ends [1, 0])", evaluator.evaluate("heldout")))
    print("| model | " + " | ".join(TASKS) + " |")
    print("|---|" + "---:|" * len(TASKS))
    for label, result in rows:
        cells = [f"{result.metrics[t][m]:.3f}" for t, m in TASKS.items()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"(held-out split: {rows[0][1].examples} examples per task; metrics: {', '.join(TASKS.values())})")


if __name__ == "__main__":
    main()
