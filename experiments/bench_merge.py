"""Per-candidate merge speed of the in-memory engine, as ratios (not a test).

    python experiments/bench_merge.py [--hidden 1024 --layers 4 --vocab 32000 --device auto]
                                      [--methods ties,della] [--sources device|host|both]

Builds a base + 3 fine-tunes (float32, a few hundred MB each), then for every searchable method (or
`--methods a,b`), with its genes mid-range, prints:
- per-candidate in-memory merge time (engine, sources resident, result written in place);
- bytes touched per second (all inputs read + the target written) as a ratio to a plain tensor copy of
  the same bytes on the same device (a copy touches 2 bytes per byte copied);
- the ratio to mergekit 0.1.5 merging the same recipe in-process (run_merge; mergekit reads the sources
  and writes the result each time, which is what a mergekit-evolve candidate costs).
With `--sources host` (or `both`) the sources stay in host memory and stream through the engine's
staging buffers: the row gives the bytes moved host->device per candidate and the time next to `device`
placement (on a CPU the "device" is host memory too, so this measures the staging copies only).
Targets (issue 2): ties/dare_ties >= 0.3x copy bandwidth, >= 5x faster than mergekit.
What each method computes once (`load+pre s`: at load; `first s`: the first candidate, which for the
subspace merges tsv_m, iso_c, iso_cts and wudi computes every tensor's merged task vector: their SVDs or
WUDI's optimisation) is not paid again: `ms/cand` is what every later candidate costs. RegMean's Gram
matrices (from random tokens here; from `merge.calibration` items in a search) are computed before the
table's clock starts; each candidate then solves one in x in system per Linear weight.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from evomerge.device import resolve_device  # noqa: E402
from evomerge.merge.engine import MergeEngine
from evomerge.merge.methods import Method  # noqa: E402
from evomerge.merge.recipe import Recipe  # noqa: E402
from evomerge.models.checkpoint import Checkpoint  # noqa: E402
from evomerge.models.loading import load_target  # noqa: E402


def make_models(root: Path, hidden: int, layers: int, vocab: int) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    paths = []
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    from safetensors.torch import save_file

    for i in range(4):
        d = root / f"m{i}"
        d.mkdir()
        state = (
            base if i == 0 else {k: v + torch.randn(v.shape, generator=g) * 0.002 for k, v in base.items()}
        )
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(d)
        paths.append(d)
    return paths


def timed(fn, reps: int, sync, best: bool = False) -> float:
    """Mean seconds per call after one warm-up call; `best` takes the fastest call instead."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if best else sum(times) / len(times)


def copy_seconds(nbytes: int, device: str, reps: int, sync) -> float:
    """Fastest plain copy of `nbytes` (the best copy makes every ratio conservative)."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src), reps, sync, best=True)


def searched_values(method: Method, count: int, i: int) -> tuple[dict, dict]:
    """(per-model, global) values for every gene of the method: inside its default range, a little
    different for each candidate `i` (as a search's candidates are)."""
    per, shared = {}, {}
    for p in method.spec.genes:
        low, high = p.gene
        value = low + (high - low) * (0.45 + 0.01 * i)
        (per if p.per_input else shared)[p.name] = value
    return per, shared


def models_for(method: Method, paths: list):
    """(base, inputs) the method merges from base + 3 fine-tunes."""
    spec = method.spec
    if not (spec.needs_base or spec.optional_base):
        base, inputs = None, list(paths)
    else:
        base, inputs = paths[0], list(paths[1:])
    return base, inputs[: spec.inputs] if spec.inputs else inputs


def rescales(args, method: Method) -> bool | None:
    """The recipe's rescale: true with --rescale where the method has one, else its default (None)."""
    return True if args.rescale and any(p.name == "rescale" for p in method.spec.params) else None


def mergekit_seconds(paths: list[Path], method: Method, reps: int, rescale: bool | None) -> float | None:
    if reps < 1 or not method.spec.in_mergekit:  # --mergekit-reps 0 (on a GPU, say), or no such method there
        return None
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    except ImportError:
        return None
    base, inputs = models_for(method, paths)
    per, shared = searched_values(method, len(inputs), 0)
    models = [{"model": str(p), **({"parameters": per} if per else {})} for p in inputs]
    cfg = {"models": models, "merge_method": method.value, "dtype": "float32"}
    if rescale:
        shared = {**shared, "rescale": True}
    if shared:
        cfg["parameters"] = shared
    if base is not None:
        cfg["base_model"] = str(base)
        if not per:  # slerp, nearswap: mergekit lists the base among the models
            cfg["models"].insert(0, {"model": str(base)})
    config = MergeConfiguration.model_validate(cfg)
    times = []
    for _ in range(reps):
        out = Path(tempfile.mkdtemp(prefix="mk-"))
        start = time.perf_counter()
        run_merge(config, str(out), MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
        times.append(time.perf_counter() - start)
        shutil.rmtree(out)
    return min(times)


def bench_one(args, method, ckpts, paths, device, sync, copy_bw, model_bytes, placement, device_ms):
    """One row: the method's per-candidate merge with its sources in `placement`; returns ms/candidate."""
    base, inputs = models_for(method, ckpts)
    target = load_target(ckpts[0], device=device)
    engine = MergeEngine(base, inputs, method, target, device=device, compile=True, placement=placement)
    if method.spec.calibrated:  # RegMean: Grams from 8 random sequences of 128 tokens per model (once)
        from evomerge.merge.calibration import grams_per_model

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab, (8, 128), generator=g).to(device)

        def each_input():
            for i in range(len(inputs)):
                engine.load_input(i)
                yield target

        engine.calibrate(grams_per_model(each_input(), [(ids, torch.ones_like(ids))], set(engine.names)))
    groups = engine.family.group_names(engine.num_layers)
    n = len(inputs)
    recipes = []
    for i in range(args.reps + 1):
        per, shared = searched_values(method, n, i)
        values = {k: (v,) * n for k, v in per.items()} | shared
        if method.spec.repair:
            values = method.spec.repair({"epsilon": (0.15,) * n} | values)
        recipes.append(Recipe.uniform(method, groups, values=values, seed=i, rescale=rescales(args, method)))
    start = time.perf_counter()
    engine.apply(recipes[0])  # compile (cached on disk by inductor after the first run) + warm-up
    sync()
    first = time.perf_counter() - start
    for recipe in recipes[1:]:  # a kernel variant some recipes need (e.g. tie-breaking) compiles here
        engine.apply(recipe)
    it = iter(recipes * 2)
    per = timed(lambda: engine.apply(next(it)), args.reps, sync)
    touched = (n + (0 if base is None else 1) + 1) * model_bytes
    label = method.value if placement == "device" else f"{method.value} (host)"
    if placement == "host":
        moved = engine._stager.bytes_per_candidate
        versus = f"{per * 1e3 / device_ms:.2f}x device" if device_ms else ""
        print(
            f"{label:<22} {engine.load_seconds:10.1f} {first:8.1f} {per * 1e3:9.1f}   moved host->device "
            f"{moved / 1e6:.0f} MB per candidate ({moved / per / 1e9:.1f} GB/s) {versus}"
        )
        return per * 1e3
    mk = mergekit_seconds(paths, method, args.mergekit_reps, rescales(args, method))
    mk_text = f"{mk:10.2f} {mk / per:9.1f}" if mk else f"{'n/a':>10} {'n/a':>9}"
    print(
        f"{label:<22} {engine.load_seconds:10.1f} {first:8.1f} {per * 1e3:9.1f} {touched / per / 1e9:7.1f} "
        f"{(touched / per) / copy_bw:7.2f} {mk_text}"
    )
    return per * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mergekit-reps", type=int, default=2)
    parser.add_argument("--methods", default="all", help="comma-separated, or all (every searchable one)")
    parser.add_argument("--rescale", action="store_true", help="rescale: true for the methods that have it")
    parser.add_argument(
        "--sources", default="device", choices=["device", "host", "both"],
        help="where base and sources live (host: streamed per tensor through staging buffers)",
    )  # fmt: skip
    args = parser.parse_args()
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    root = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        paths = make_models(root, args.hidden, args.layers, args.vocab)
        ckpts = [Checkpoint.open(p) for p in paths]
        model_bytes = sum(4 * torch.Size(i.shape).numel() for i in ckpts[0].tensors.values())
        print(f"device {device}; 3 sources + base, {model_bytes / 1e6:.0f} MB each (float32)")

        copy_s = copy_seconds(model_bytes, device, 4 * args.reps, sync)
        copy_bw = 2 * model_bytes / copy_s
        print(
            f"plain copy of {model_bytes / 1e6:.0f} MB: {copy_s * 1e3:.1f} ms ({copy_bw / 1e9:.1f} GB/s touched)"
        )
        print(
            f"{'method':<22} {'load+pre s':>10} {'first s':>8} {'ms/cand':>9} {'GB/s':>7} {'x copy':>7} {'mergekit s':>10} {'x faster':>9}"
        )
        names = (
            [m.value for m in Method if m.spec.genes] if args.methods == "all" else args.methods.split(",")
        )
        placements = ["device", "host"] if args.sources == "both" else [args.sources]
        for name in names:
            method = Method(name)
            device_ms = None
            for placement in placements:
                device_ms = bench_one(
                    args, method, ckpts, paths, device, sync, copy_bw, model_bytes, placement, device_ms
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
