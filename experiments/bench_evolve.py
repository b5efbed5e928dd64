"""What one candidate of a mergekit-evolve config costs in mergekit-evolve and in evomerge (issue 28).

mergekit-evolve's per-candidate path, run with its own functions (mergekit.evo.helpers): `merge_model`
writes the genotype's merge to disk with run_merge, `evaluate_model` (its body: `_eval_model`, without
the vLLM monkeypatch that needs vllm installed) loads it through lm-eval's Hugging Face model and
deletes it. evomerge's path: the sources resident once, the candidate merged in place and
scored by the search's evaluator. Same config (configs/mergekit-evolve-zoo.yaml), same genotypes, same
items count (its limit), CPU, one process; prints seconds per candidate and the ratio.

    python experiments/bench_evolve.py [--candidates 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "mergekit-evolve-zoo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=5)
    args = parser.parse_args()

    from mergekit.evo.config import EvolMergeConfiguration
    from mergekit.evo.genome import ModelGenome
    from mergekit.evo.helpers import _eval_model, merge_model
    from mergekit.options import MergeOptions

    from evomerge.evaluate.tasks import task_manager
    from evomerge.migrate import load_config
    from evomerge.runtime.worker import build_worker
    from evomerge.search.evolve_space import EvolveSpace
    from evomerge.strict_yaml import load_yaml

    raw = load_yaml(CONFIG)
    for key in ("models",):
        raw["genome"][key] = [str((CONFIG.parent / m).resolve()) for m in raw["genome"][key]]
    raw["genome"]["base_model"] = str((CONFIG.parent / raw["genome"]["base_model"]).resolve())
    theirs = EvolMergeConfiguration.model_validate(raw)
    genome = ModelGenome(theirs.genome)
    rng = np.random.default_rng(0)
    x0 = genome.initial_genotype().view(-1).numpy()
    genotypes = [x0 + rng.normal(0, 1 / 6, x0.shape) for _ in range(args.candidates)]

    config, config_dir = load_config(CONFIG, ["--storage-path", "unused"])
    runtime = config.runtime.model_copy(update={"device": "cpu", "placement": "device", "pin_memory": "off"})
    config = config.model_copy(update={"runtime": runtime})
    manager = task_manager([t.name for t in config.evaluation.tasks])
    started = time.perf_counter()
    worker = build_worker(config, config_dir, manager)
    load = time.perf_counter() - started
    space = EvolveSpace(config, worker.engine.num_layers)
    ours = []
    for g in genotypes:
        recipe = space.decode(space.to_unit(g))
        started = time.perf_counter()
        outcome = worker.evaluate(recipe)
        assert outcome.ok, outcome.reason
        ours.append(time.perf_counter() - started)

    options = MergeOptions(cuda=False, copy_tokenizer=True, quiet=True)
    tasks, limit = theirs.tasks, theirs.limit
    with tempfile.TemporaryDirectory() as storage:
        mine = []
        for g in genotypes:
            started = time.perf_counter()
            path = merge_model(g, genome, storage, options)
            # evaluate_model's body without its vLLM monkeypatch (which imports vllm even when unused)
            _eval_model("hf", tasks, {"pretrained": path, "dtype": "bfloat16", "use_cache": True, "device": "cpu"},
                        task_manager=manager, num_fewshot=None, limit=limit, apply_chat_template=False)  # fmt: skip
            shutil.rmtree(path)
            mine.append(time.perf_counter() - started)
    a, b = statistics.median(ours), statistics.median(mine)
    print(f"per candidate (median of {args.candidates}, {limit} items of {tasks[0].name}, CPU):")
    print(f"  mergekit-evolve (merge_model + evaluate_model): {b:.2f} s")
    print(
        f"  evomerge (in-place merge + evaluator):          {a:.3f} s   (sources loaded once: {load:.1f} s)"
    )
    print(f"  ratio: {b / a:.0f}x")


if __name__ == "__main__":
    main()
