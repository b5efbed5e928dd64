"""Per-candidate evaluation time: the evaluator (wrapper and task dict built once, weights swapped in
place) against lm-eval's simple_evaluate called per candidate on the same model and task (a ratio).

    python experiments/bench_eval.py [--model zoo/math-en] [--task zoo_math_x] [--examples 100] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


from evomerge.evaluate import EvaluationSpec, Evaluator  # noqa: E402
from evomerge.evaluate.run import load_model_and_tokenizer  # noqa: E402
from evomerge.evaluate.tasks import task_manager  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(REPO / "zoo" / "math-en"))
    parser.add_argument(
        "--other", default=str(REPO / "zoo" / "lang-x"), help="weights swapped in every other candidate"
    )
    parser.add_argument("--task", default="zoo_math_en")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model, tok = load_model_and_tokenizer(args.model, device=args.device, dtype="float32")
    other, _ = load_model_and_tokenizer(args.other, device=args.device, dtype="float32")
    states = [{k: v.clone() for k, v in model.state_dict().items()}, other.state_dict()]

    spec = EvaluationSpec.model_validate(
        {"tasks": [{"name": args.task}], "split": {"heldout": 0.5}, "batch_size": 64}
    )
    started = time.perf_counter()
    evaluator = Evaluator(model, tok, spec)
    build = time.perf_counter() - started
    indices = evaluator.indices(args.task, "search")[: args.examples]
    evaluator.specs[args.task] = evaluator.specs[args.task].model_copy(update={"limit": args.examples})

    def ours(i: int) -> float:
        model.load_state_dict(states[i % 2])
        return evaluator.evaluate("search").fitness

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager([args.task])

    def per_candidate(i: int) -> float:
        model.load_state_dict(states[i % 2])
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=64)
        out = simple_evaluate(
            model=lm, tasks=[args.task], task_manager=manager, samples={args.task: indices},
            bootstrap_iters=0, log_samples=False, verbosity="ERROR",
        )  # fmt: skip
        return float(next(v for k, v in out["results"][args.task].items() if "," in k and "stderr" not in k))

    results = {}
    for name, fn in (("evaluator (built once)", ours), ("simple_evaluate per candidate", per_candidate)):
        fn(0)  # warm-up
        times, values = [], []
        for i in range(args.reps):
            t0 = time.perf_counter()
            values.append(fn(i))
            times.append(time.perf_counter() - t0)
        results[name] = sum(times) / len(times)
        print(f"{name:<32} {results[name] * 1e3:8.0f} ms/candidate  scores {[round(v, 3) for v in values]}")
    ratio = results["simple_evaluate per candidate"] / results["evaluator (built once)"]
    print(
        f"evaluator build (once): {build:.2f}s; {args.examples} examples of {args.task}; speed-up {ratio:.1f}x"
    )


if __name__ == "__main__":
    main()
