"""mergekit-evolve's genome, for its users' configs (issue 28): what one of its genotypes means as a merge.

mergekit-evolve (deprecated in mergekit's Transformers-5 release) searches a genotype of shape
(layer groups, models, filter sets, parameters): `layer_granularity` layers per group (0: one group),
one parameter set per `filters` entry plus one for every other tensor, and the method's parameters
(weight; density for ties and dare_ties; t for slerp). A genotype becomes a mergekit merge config: weights
(and t) taken as absolute values unless `allow_negative_weights`, densities as |x| clipped to [0, 1];
per layer group one slice per model, or with `smooth` one gradient per model over the layer groups;
for slerp, per group the two models with the highest weight and t = softmax of their weights. This module
re-implements that mapping (tested equal to mergekit 0.1.5's `ModelGenome.genotype_merge_config`, config
and merged tensors); the search drives it like any other space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

METHOD_PARAMS = {  # mergekit-evolve's methods and the genes of each, in its order
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}


class EvolveGenome(BaseModel):
    """mergekit-evolve's `genome:` section (its ModelGenomeDefinition), with its rules as one-line errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    models: list[str] = Field(min_length=1)
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = 0
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False

    @model_validator(mode="after")
    def _rules(self) -> EvolveGenome:
        if self.merge_method not in METHOD_PARAMS:
            raise ValueError(
                f"merge_method: mergekit-evolve has no {self.merge_method!r} ({', '.join(METHOD_PARAMS)})"
            )
        if self.merge_method in ("ties", "dare_ties", "task_arithmetic") and self.base_model is None:
            raise ValueError(f"base_model is required for {self.merge_method}")
        if self.merge_method == "slerp" and self.smooth:
            raise ValueError("smooth is not supported for slerp (mergekit-evolve refuses it too)")
        if self.merge_method == "slerp" and self.filters:
            raise ValueError("filters are not supported for slerp (mergekit-evolve refuses them too)")
        return self

    def groups(self, num_layers: int) -> int:
        if self.layer_granularity > 0 and num_layers % self.layer_granularity:
            raise ValueError(
                f"layer_granularity {self.layer_granularity} does not divide the models' {num_layers} layers"
            )
        return num_layers // self.layer_granularity if self.layer_granularity > 0 else 1

    def shape(self, num_layers: int) -> tuple[int, int, int, int]:
        """(layer groups, models, parameter sets, parameters) of a genotype."""
        sets = len(self.filters or []) + 1
        return self.groups(num_layers), len(self.models), sets, len(METHOD_PARAMS[self.merge_method])

    def initial_genotype(self, num_layers: int):
        """mergekit-evolve's starting point: every weight 1/models, every density (or other gene) 1."""
        import torch

        x0 = torch.zeros(self.shape(num_layers))
        x0[:, :, :, 0] = 1 / len(self.models)
        x0[:, :, :, 1:] = 1
        return x0

    def merge_config(self, genotype, num_layers: int) -> dict[str, Any]:
        """The mergekit merge config a genotype (flat, or of `shape`) stands for, as plain data."""
        import torch

        g = torch.as_tensor(genotype)
        g = g.reshape(self.shape(num_layers)) if g.dim() == 1 else g
        if tuple(g.shape) != self.shape(num_layers):
            raise ValueError(f"genotype of shape {tuple(g.shape)}, expected {self.shape(num_layers)}")
        step = self.layer_granularity if self.layer_granularity > 0 else num_layers
        models, slices = None, None
        if self.merge_method == "slerp":
            slices = [self._slerp_slice(g, k, step) for k in range(g.shape[0])]
        else:
            values = {}
            for j, name in enumerate(METHOD_PARAMS[self.merge_method]):
                v = g[:, :, :, j]
                if name == "density":
                    v = v.abs().clamp(0, 1)
                elif not self.allow_negative_weights:
                    v = v.abs()
                values[name] = v
            if self.smooth:
                models = [self._smooth_model(values, i, num_layers) for i in range(len(self.models))]
                if self.base_model and self.base_model not in self.models:
                    models.append({"model": self.base_model})
            else:
                slices = [self._slice(values, k, step) for k in range(g.shape[0])]
        normalize = self.normalize
        if normalize is None:
            normalize = self.merge_method in ("ties", "dare_ties", "linear")
        return {
            "merge_method": self.merge_method, "slices": slices, "models": models,
            "parameters": {"normalize": normalize, "int8_mask": True}, "dtype": "bfloat16",
            "base_model": self.base_model, "tokenizer_source": self.tokenizer_source,
        }  # fmt: skip

    def _setting(self, per_set: list[Any]) -> Any:
        """One parameter's value over the filter sets: plain, or one {filter, value} per set (None: the rest)."""
        if len(per_set) == 1:
            return per_set[0]
        names = [*(self.filters or []), None]
        return [{"filter": f, "value": v} for f, v in zip(names, per_set, strict=True)]

    def _slice(self, values, k: int, step: int) -> dict[str, Any]:
        layers = [k * step, (k + 1) * step]
        sources = []
        for i, model in enumerate(self.models):
            params = {
                name: self._setting([v[k, i, s].item() for s in range(v.shape[2])])
                for name, v in values.items()
            }
            sources.append({"model": model, "layer_range": layers, "parameters": params})
        if self.base_model and self.base_model not in self.models:
            sources.append({"model": self.base_model, "layer_range": layers})
        return {"sources": sources}

    def _smooth_model(self, values, i: int, num_layers: int) -> dict[str, Any]:
        def gradient(v):  # one value per layer group: mergekit's gradient list (a single value stays plain)
            out = v.tolist()
            return out[0] if len(out) == 1 else out

        params = {
            name: self._setting([gradient(v[:, i, s]) for s in range(v.shape[2])])
            for name, v in values.items()
        }
        return {"model": self.models[i], "layer_range": [0, num_layers], "parameters": params}

    def _slerp_slice(self, g, k: int, step: int) -> dict[str, Any]:
        import torch

        layers = [k * step, (k + 1) * step]
        top = torch.topk(g[k, :, 0, 0], 2)
        first, second = (int(x) for x in top.indices)
        t = torch.softmax(top.values, dim=-1)[1].item()
        sources = [{"model": self.models[i], "layer_range": layers} for i in (first, second)]
        if self.tokenizer_source:
            sources[0]["parameters"] = {"weight": 1 - t}
            sources[1]["parameters"] = {"weight": t}
        if self.base_model and self.base_model not in self.models:
            sources.append({"model": self.base_model, "layer_range": layers})
        return {"sources": sources, "parameters": {"t": t}, "base_model": self.models[first]}


# ---- the whole mergekit-evolve config, translated at the door into an experiment config ----


class EvolveTask(BaseModel):
    """A task of mergekit-evolve's `tasks:` (a bare name, or name/weight/metric)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    weight: float = 1.0
    metric: str = "acc,none"  # mergekit-evolve's default (lm-eval's key for accuracy)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class EvolveConfig(BaseModel):
    """mergekit-evolve's config file (its EvolMergeConfiguration), with its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    genome: EvolveGenome
    tasks: list[EvolveTask] = Field(min_length=1)
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
    from evomerge.errors import UserError

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

    from evomerge.config import format_validation_error
    from evomerge.errors import UserError

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

    from evomerge.config import parse_config
    from evomerge.errors import UserError
    from evomerge.files import atomic_write
    from evomerge.strict_yaml import load_yaml

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
