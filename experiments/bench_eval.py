"""Per-candidate evaluation time on the demo's tasks, split into model forward time (timed around every
call of the model's forward) and the rest (requests, filters, metrics), before and after building the
request instances once:

- before: `lm_eval.evaluator.evaluate` per candidate on a task dict built once (what evomerge did until
  requests were cached: every call renders every prompt and few-shot context again);
- after: `Evaluator.evaluate` (requests built once per split, targets and tokenizations kept; per
  candidate only LM calls, filters, metrics).

Both score the same items with the same weights and must give the same numbers (checked). Candidates
alternate between two models' weights, swapped in place.

    python experiments/bench_eval.py [--reps 4] [--device cpu]
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

from evomerge.config import load_config  # noqa: E402
from evomerge.evaluate import Evaluator  # noqa: E402
from evomerge.evaluate.evaluator import build_tasks, fewshot_seed  # noqa: E402
from evomerge.evaluate.run import load_model_and_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class ForwardClock:
    """Seconds spent inside the model's forward (hooks around every call, generation steps included)."""

    def __init__(self, model) -> None:
        self.seconds = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(self._enter)
        model.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--model", default=str(REPO / "zoo" / "math-en"))
    parser.add_argument("--other", default=str(REPO / "zoo" / "lang-x"), help="weights of every other candidate")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config, _ = load_config(args.config)
    model, tok = load_model_and_tokenizer(args.model, device=args.device, dtype="float32")
    other, _ = load_model_and_tokenizer(args.other, device=args.device, dtype="float32")
    states = [{k: v.clone() for k, v in model.state_dict().items()}, other.state_dict()]
    del other
    evaluator = Evaluator(model, tok, config.evaluation)
    clock = ForwardClock(model)
    samples = {name: evaluator.indices(name, "search") for name in evaluator.task_dict}

    def after(i: int) -> dict:
        model.load_state_dict(states[i % 2])
        return evaluator.evaluate("search").metrics

    # before: lm-eval untouched (its own task objects and wrapper, nothing cached between calls)
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    plain_tasks, _ = build_tasks(config.evaluation)
    plain_lm = HFLM(pretrained=model, tokenizer=tok, batch_size=config.evaluation.batch_size)

    def before(i: int) -> dict:
        model.load_state_dict(states[i % 2])
        for name, task in plain_tasks.items():  # the few-shot seeds the evaluator uses
            task.set_fewshot_seed(seed=fewshot_seed(config.evaluation.split.seed, name))
        evaluator.reseed()
        out = evaluate(
            lm=plain_lm, task_dict=plain_tasks, samples=samples, bootstrap_iters=0,
            log_samples=False, verbosity="ERROR",
        )  # fmt: skip
        return {
            name: {k: float(v) for k, v in out["results"][name].items() if "," in k and "stderr" not in k}
            for name in plain_tasks
        }

    rows, scores = {}, {}
    for name, fn in (("before: lm-eval evaluate per candidate", before), ("after: requests built once", after)):
        fn(0)  # warm-up (builds the requests once for `after`)
        total = forward = 0.0
        scores[name] = []
        for i in range(args.reps):
            clock.seconds = 0.0
            t0 = time.perf_counter()
            scores[name].append(fn(i))
            total += time.perf_counter() - t0
            forward += clock.seconds
        rows[name] = (total / args.reps, forward / args.reps)
    items = sum(len(ix) for ix in samples.values())
    print(f"demo tasks {', '.join(samples)}: {items} search items per candidate, {args.reps} candidates, {args.device}")
    print(f"{'':<40} {'per candidate':>14} {'forward':>9} {'rest':>9} {'rest share':>10}")
    for name, (total, forward) in rows.items():
        rest = total - forward
        print(f"{name:<40} {total * 1e3:11.0f} ms {forward * 1e3:6.0f} ms {rest * 1e3:6.0f} ms {rest / total:9.0%}")
    same = scores["before: lm-eval evaluate per candidate"] == scores["after: requests built once"]
    (tb, fb), (ta, fa) = rows.values()
    print(f"same scores: {same}; per-candidate speed-up {tb / ta:.2f}x; the rest {(tb - fb) / (ta - fa):.1f}x smaller")


if __name__ == "__main__":
    main()
