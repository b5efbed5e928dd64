"""Bringing a mergekit-evolve config as it is (issue 28): its file and flags translated at the door into an
experiment config (whose `mergekit_genome` searches its genotype, evomerge/mergekit_evolve.py), which then
runs like any other. `evomerge search|validate evolve.yml [flags]` translate on the fly; `evomerge import`
writes the translation down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from evomerge.config import ExperimentConfig, format_validation_error, parse_config
from evomerge.errors import UserError
from evomerge.mergekit_evolve import EvolveGenome
from evomerge.strict_yaml import load_yaml


class EvolveTask(BaseModel):
    """A task of mergekit-evolve's `tasks:` (a bare name, or name/weight/metric)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    weight: float = 1.0
    metric: str = "acc,none"  # mergekit-evolve's default (lm-eval's key for accuracy)


def _bare_name(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class EvolveConfig(BaseModel):
    """mergekit-evolve's config file (its EvolMergeConfiguration), with its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    genome: EvolveGenome
    tasks: list[
        Annotated[EvolveTask, BeforeValidator(_bare_name, json_schema_input_type=EvolveTask | str)]
    ] = Field(min_length=1, description="lm-eval tasks: a name, or name, weight and metric")
    limit: int | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True


def is_evolve_config(raw: Any) -> bool:
    """A mergekit-evolve config is told apart by its `genome:` section."""
    return isinstance(raw, dict) and "genome" in raw


# mergekit-evolve's command-line flags: (flag, takes a value, type); the booleans also as --no-<flag>
FLAGS: dict[str, type | None] = {
    "max-fevals": int, "sigma0": float, "random-seed": int, "storage-path": str, "num-gpus": int,
    "batch-size": int, "force-population-size": int, "timeout": float, "task-search-path": str,
    "strategy": str, "wandb-project": str, "wandb-entity": str,
    "vllm": None, "in-memory": None, "merge-cuda": None, "trust-remote-code": None, "allow-crimes": None,
    "wandb": None, "save-final-model": None, "reshard": None, "load-in-8bit": None, "load-in-4bit": None,
    "i-understand-the-depths-of-the-evils-i-am-unleashing": None,
}  # fmt: skip

# flags with no meaning here: what evomerge does instead (said once each when given)
INSTEAD = {
    "vllm": "evomerge scores with lm-eval's Hugging Face model, in memory, on the merged weights (no vLLM)",
    "in-memory": "evomerge always merges in memory: sources resident once, no model written per candidate",
    "strategy": "evomerge has no generation barrier: a worker takes the next candidate as soon as it is free",
    "merge-cuda": "merges run where the model lives (runtime.device: cuda when present)",
    "reshard": "sources are read once into memory; no resharded copies are written",
    "wandb": "progress is shown in the terminal and journaled; `evomerge report` draws the plots",
    "wandb-project": "no Weights & Biases logging; `evomerge report` reads the journal",
    "wandb-entity": "no Weights & Biases logging; `evomerge report` reads the journal",
    "load-in-8bit": "evomerge evaluates at runtime.dtype (bfloat16 here); quantised loading is not offered",
    "load-in-4bit": "evomerge evaluates at runtime.dtype (bfloat16 here); quantised loading is not offered",
    "save-final-model": "no model is written at the end: `evomerge export EXPERIMENT OUT` writes the winner",
    "i-understand-the-depths-of-the-evils-i-am-unleashing":
        "benchmark tasks are allowed: evomerge selects on their search split and reports held-out items",
}  # fmt: skip


def parse_flags(args: list[str]) -> dict[str, Any]:
    """mergekit-evolve's flags as given (`--flag value`, `--flag=value`, `--flag`, `--no-flag`)."""
    given: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r} (mergekit-evolve flags start with --)")
        name, _, value = arg[2:].partition("=")
        negated = name.startswith("no-") and name[3:] in FLAGS and FLAGS[name[3:]] is None
        key = name[3:] if negated else name
        if key == "s":
            key = "strategy"
        if key not in FLAGS:
            raise UserError(f"--{name}: not a mergekit-evolve flag")
        kind = FLAGS[key]
        if kind is None:
            if value:
                raise UserError(f"--{name} takes no value")
            given[key] = not negated
        else:
            if not value:
                i += 1
                if i >= len(args):
                    raise UserError(f"--{name} needs a value")
                value = args[i]
            try:
                converted = kind(value)
            except ValueError:
                raise UserError(f"--{name}: expected {kind.__name__}, got {value!r}") from None
            if key == "task-search-path":
                given.setdefault(key, []).append(converted)
            else:
                given[key] = converted
        i += 1
    return given


def translate(raw: dict[str, Any], where: str, flags: dict[str, Any] | None = None) -> tuple[dict, list[str]]:
    """The experiment config a mergekit-evolve config (and its command-line flags) means, as plain data,
    and one note per key or flag that means nothing here. Refuses what evomerge cannot honour."""
    from pydantic import ValidationError

    flags = dict(flags or {})
    try:
        cfg = EvolveConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, where)) from None
    g = cfg.genome
    notes = [f"--{key}: {INSTEAD[key]}" for key in flags if key in INSTEAD and flags[key] is not False]
    for key, why in (
        ("timeout", "evomerge stops at the budget (--max-fevals); interrupt it any time and run the same "
                    "command to resume"),
        ("allow-crimes", "evomerge merges models of one architecture only"),
        ("trust-remote-code", "evomerge loads models with transformers' own classes only"),
    ):  # fmt: skip
        if flags.get(key):
            raise UserError(f"--{key} is not supported: {why}")
    if flags.get("load-in-8bit") and flags.get("load-in-4bit"):
        raise UserError("--load-in-8bit and --load-in-4bit cannot both be set")  # as mergekit-evolve says
    base = g.base_model
    if base is not None and base in g.models:
        if g.merge_method in ("ties", "dare_ties", "task_arithmetic"):
            raise UserError(
                f"{where}: genome.base_model {base} is also one of genome.models: its genes would change nothing "
                "(it is the base); list it only as base_model"
            )
        base = None  # linear and slerp take it as one of the models only
    negative = g.allow_negative_weights
    sigma0 = flags.get("sigma0", 1 / 6)
    if sigma0 <= 0:
        raise UserError(f"--sigma0 must be positive, got {sigma0}")
    width = 2.0 if negative else 1.0  # the weight genes' range: a box step of sigma0/width is sigma0 there
    optimizer: dict[str, Any] = {
        "name": "cma", "budget": flags.get("max-fevals", 100), "seed": flags.get("random-seed", 0),
        "sigma0": min(sigma0 / width, 1.0),
    }  # fmt: skip
    if "force-population-size" in flags:
        optimizer["popsize"] = flags["force-population-size"]
    genome: dict[str, Any] = {
        "layer_granularity": g.layer_granularity, "allow_negative_weights": negative, "smooth": g.smooth,
    }  # fmt: skip
    for key, value in (
        ("normalize", g.normalize), ("filters", g.filters), ("tokenizer_source", g.tokenizer_source),
        ("random_init", cfg.random_init or None),
    ):  # fmt: skip
        if value is not None:
            genome[key] = value
    tasks = []
    for t in cfg.tasks:
        task: dict[str, Any] = {"name": t.name, "metric": t.metric, "weight": t.weight}
        if cfg.num_fewshot is not None:
            task["num_fewshot"] = cfg.num_fewshot
        if cfg.limit is not None:
            task["limit"] = cfg.limit
        tasks.append(task)
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise UserError(
            f"{where}: tasks: a task is listed twice (mergekit-evolve would score it once and count it twice); "
            "give it once with the summed weight"
        )
    evaluation: dict[str, Any] = {"tasks": tasks}
    if cfg.apply_chat_template:
        evaluation["chat_template"] = True
        evaluation["fewshot_as_multiturn"] = cfg.fewshot_as_multiturn
    if flags.get("task-search-path"):
        evaluation["include_paths"] = flags["task-search-path"]
    if "batch-size" in flags:
        evaluation["batch_size"] = flags["batch-size"]
    if cfg.shuffle:
        notes.append(
            "shuffle: evomerge always draws a task's items in a seeded random order (evaluation.split.seed), "
            "so every candidate and every resumed run sees the same items"
        )
    runtime: dict[str, Any] = {"dtype": "bfloat16"}  # mergekit-evolve merges and evaluates in bfloat16
    gpus = flags.get("num-gpus")
    if gpus is not None and gpus > 1:
        runtime |= {"executor": "ray", "ray": {"workers": gpus}}
    data = {
        "name": Path(where).stem,
        "models": {"base": base, "sources": list(g.models)} if base else {"sources": list(g.models)},
        "merge": {"method": g.merge_method},
        "mergekit_genome": genome,
        "optimizer": optimizer,
        "evaluation": evaluation,
        "runtime": runtime,
        "output": {"dir": flags.get("storage-path") or f"{Path(where).stem}-evomerge"},
    }
    if negative:
        data["space"] = {"weight": {"min": -1.0, "max": 1.0}}
    return data, notes


def import_config(src: Path, dst: Path, args: list[str], *, force: bool = False) -> list[str]:
    """`evomerge import`: write the experiment config a mergekit-evolve config means (checked as
    `evomerge validate` checks it: schema only, nothing opened), model paths relative to `dst`'s folder."""
    import os

    import yaml

    from evomerge.files import atomic_write

    if not src.is_file():
        raise UserError(f"config file not found: {src}")
    raw = load_yaml(src)
    if not is_evolve_config(raw):
        raise UserError(f"{src}: not a mergekit-evolve config (it has no genome: section)")
    if dst.exists() and not force:
        raise UserError(f"{dst} exists: add --force to replace it")
    if dst.is_dir():
        raise UserError(f"{dst} is a directory; name the config file to write")
    data, notes = translate(raw, str(src), parse_flags(args))
    parse_config(data, str(src))  # what is written is a valid experiment

    def moved(ref: str | None) -> str | None:  # a folder beside the old config, named from the new one
        if ref is None or Path(ref).is_absolute() or not (src.parent / ref).is_dir() or Path(ref).is_dir():
            return ref
        return os.path.relpath(src.parent.resolve() / ref, dst.parent.resolve())

    models = data["models"]
    models["sources"] = [moved(r) for r in models["sources"]]
    if models.get("base"):
        models["base"] = moved(models["base"])
    header = [f"# evomerge experiment translated from the mergekit-evolve config {src}", "#   evomerge import "
              f"{src} -o {dst}{' ' if args else ''}{' '.join(args)}"]  # fmt: skip
    header += [f"# note: {n}" for n in notes]
    text = "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, text.encode())
    return notes


def load_config(path: str | Path, evolve_args: list[str] | None = None) -> tuple[ExperimentConfig, Path]:
    """config.load_config, and a mergekit-evolve config (it has `genome:`) translated at the door with
    `evolve_args` (its flags); each flag or key that means nothing here is said once, as a warning."""
    import logging

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    raw = load_yaml(path)  # read once, whichever kind it is
    if is_evolve_config(raw):
        raw, notes = translate(raw, str(path), parse_flags(evolve_args or []))
        for note in notes:
            logging.getLogger("evomerge.migrate").warning("%s", note)
    elif evolve_args:
        raise UserError(
            f"{evolve_args[0]}: unknown option ({path} is an experiment config; mergekit-evolve's flags go "
            "with mergekit-evolve configs)"
        )
    return parse_config(raw, str(path)), path.resolve().parent
