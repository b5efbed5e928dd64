"""What one worker (a local process or a Ray actor) holds in memory, measured on the zoo and computed for
a real model: sources resident once, the target it merges into, TIES threshold tables, and the process.

    python experiments/worker_memory.py [--config configs/demo.yaml] [--params 7.24e9] [--layers 32]
        [--bytes 2] [--sources 3] [--kv-per-token 131072] [--tokens 16384]

The 7B figures assume the EvoLLM-JP setting: Mistral-7B (7.24e9 parameters, 32 layers, bf16) as base
with 3 sources, and lm-eval generating for a batch of 16 sequences of up to 1024 tokens (the KV cache of
Mistral's grouped-query attention is 128 KiB per token in bf16).
"""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from evomerge.config import load_config  # noqa: E402
from evomerge.runtime.worker import build_worker  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--params", type=float, default=7.24e9)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--bytes", type=int, default=2, help="bytes per parameter (bf16: 2)")
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--kv-per-token", type=int, default=2 * 32 * 8 * 128 * 2)
    parser.add_argument("--tokens", type=int, default=16 * 1024)
    args = parser.parse_args()

    config, config_dir = load_config(args.config)
    from evomerge.runtime.plan import resolve_runtime
    from evomerge.validate import check_config

    config = resolve_runtime(config, check_config(config, config_dir, resolve=True)).apply(config)
    import lm_eval  # noqa: F401  (imported before the baseline, so the baseline holds the libraries)
    import torch

    before = rss()
    worker = build_worker(config, config_dir)
    loaded = rss()
    worker.evaluate(worker_recipe(worker), "search")
    evaluated = rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    engine = worker.engine
    model_bytes = sum(t.numel() * t.element_size() for t in engine.inputs[0].values())
    tensors = len(engine.names)
    sources = engine.resident_bytes
    target = sum(t.numel() * t.element_size() for t in engine.targets.values())
    per_tensor = [state[0] for state in engine.state.values() if isinstance(state, tuple)]  # TIES: (tables, uniforms)
    tables = sum(table.nbytes for per in per_tensor for table in per)
    per_table = tables / max(1, sum(len(per) for per in per_tensor))
    n = len(engine.inputs)
    print(
        f"zoo ({config.merge.method.value}, base + {n} sources, {model_bytes / 2**20:.2f} MiB per model, {tensors} tensors)"
    )
    print(
        f"  sources resident   {sources / 2**20:8.2f} MiB  = {sources / model_bytes:.2f} x one model (base + {n})"
    )
    print(f"  target model       {target / 2**20:8.2f} MiB  = {target / model_bytes:.2f} x one model")
    print(
        f"  TIES tables        {tables / 2**20:8.2f} MiB  ({per_table / 1024:.0f} KiB per tensor per source)"
    )
    print(f"  process RSS        {before / 2**20:8.0f} MiB libraries, +{(loaded - before) / 2**20:.0f} MiB after load, "
          f"+{(evaluated - loaded) / 2**20:.0f} MiB after one evaluation (peak {peak / 2**20:.0f} MiB)")  # fmt: skip

    p, b, k = args.params, args.bytes, args.sources
    model = p * b
    tensors_7b = 3 + 9 * args.layers  # embed, norm, head + per layer: 7 projections, 2 norms
    sources_7b = (1 + k) * model
    from evomerge.merge.kernels.trim import ThresholdTable

    big_table = ThresholdTable(torch.rand(4096 * 4096)).nbytes  # a table's size grows with log(numel)
    tables_7b = tensors_7b * k * big_table
    kv = args.kv_per_token * args.tokens
    total = sources_7b + model + tables_7b + kv
    print(f"\n{p / 1e9:.2f}B parameters, {b} bytes each, base + {k} sources (computed with the ratios above)")
    print(f"  sources resident   {sources_7b / GiB:6.1f} GiB  (base + {k} x {model / GiB:.1f} GiB)")
    print(f"  target model       {model / GiB:6.1f} GiB")
    print(
        f"  TIES tables        {tables_7b / GiB:6.2f} GiB  ({tensors_7b} tensors x {k} sources x {big_table / 1024:.0f} KiB; ties only)"
    )
    print(f"  KV cache           {kv / GiB:6.1f} GiB  ({args.tokens} tokens in flight)")
    print(
        f"  total              {total / GiB:6.1f} GiB per worker, plus ~{peak / GiB:.1f} GiB of host RAM for the process"
    )


def worker_recipe(worker) -> dict:
    from evomerge.merge.recipe import Recipe
    from evomerge.search.space import default_params

    params = default_params(worker.engine.method, len(worker.engine.inputs))
    groups = {name: params for name in worker.engine.names}
    return Recipe(worker.engine.method, groups).to_dict()


if __name__ == "__main__":
    main()
