"""`evomerge export`: a candidate of an experiment as a normal Hugging Face model directory.

The weights are merged with the exact kernels (true top-k for TIES, the candidate's own seeded DARE masks),
tensor by tensor, into a staged directory that appears complete or not at all. Beside them: a model card
and a `mergekit_config.yml` that expresses the per-group recipe as mergekit `filter` conditionals, so
`mergekit-yaml` (deterministic methods) and `evomerge merge` rebuild the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import ExperimentConfig
from evomerge.errors import UserError
from evomerge.files import atomic_write, one_line
from evomerge.merge.methods import TensorParams, merge_tensor
from evomerge.merge.recipe import ConfigRecipe, PathRecipe, Recipe, parse_recipe
from evomerge.models.architecture import EMBED, HEAD, Family, merged_names
from evomerge.models.identity import open_recorded
from evomerge.results import ExperimentView, search_fitness, task_cell


@dataclass
class ExportSummary:
    out_dir: Path
    candidate: int
    rank: int
    tensors: int


def group_filters(family: Family, group: str, tensors: list[str]) -> list[str]:
    """Substrings that select exactly the tensors of `group` (mergekit: first matching filter wins)."""
    if group in (EMBED, HEAD):
        return [t for t in tensors if family.group(t) == group]
    parts = group.split(".")  # layers.N or layers.N.attn|mlp
    prefix = f"model.layers.{parts[1]}"
    if len(parts) == 2:
        return [prefix + "."]
    markers = family.attn_markers if parts[2] == "attn" else family.mlp_markers
    return [prefix + marker for marker in markers]


def recipe_to_mergekit(
    recipe: Recipe, base: str | None, sources: list[str], family: Family, tensors: list[str], dtype: str
) -> dict[str, Any]:
    """A mergekit merge config giving every tensor the parameters `recipe` gives it."""
    spec = recipe.method.spec
    filters = {group: group_filters(family, group, tensors) for group in recipe.groups}

    def setting(value_of) -> list[dict[str, Any]]:
        return [
            {"filter": f, "value": value_of(params)}
            for group, params in recipe.groups.items()
            for f in filters[group]
        ]

    def searched(name: str) -> bool:
        return any(name in g.values for g in recipe.groups.values())

    def group_value(g, param, j=None):
        value = g.get(param.name)
        if value is None:
            return param.default
        return float(value[j]) if j is not None else float(value)

    shared: dict[str, Any] = {}
    given = recipe.shared()
    for param in spec.params:
        if param.per_input or param.name == "int8_mask":
            continue
        if param.name == "exclude" and recipe.exclude:  # the tensors it is true for, by the same substrings
            shared["exclude"] = [{"filter": part, "value": True} for part in recipe.exclude]
            shared["exclude"].append({"filter": "*", "value": False})
            continue
        if searched(param.name):
            shared[param.name] = setting(lambda g, param=param: group_value(g, param))
        else:
            shared[param.name] = given.get(param.name, param.default)
    models = []
    per_input = [p for p in spec.params if p.per_input and (searched(p.name) or p.default is None)]
    for j, ref in enumerate(sources):
        params = {p.name: setting(lambda g, p=p, j=j: group_value(g, p, j)) for p in per_input}
        models.append({"model": ref, "parameters": params} if params else {"model": ref})
    if spec.needs_base and not per_input:  # mergekit lists slerp's two models, the base among them
        models.insert(0, {"model": base})
    config: dict[str, Any] = {
        "merge_method": recipe.method.value,
        "models": models,
        "parameters": shared,
        "dtype": dtype,
    }
    if base is not None and (spec.needs_base or spec.optional_base):
        config["base_model"] = base
    return config


def export_candidate(
    exp_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 1,
    force: bool = False,
    candidate_id: int | None = None,
) -> ExportSummary:
    from evomerge.merge.mergekit_config import ConfigPlan, MergeConfig
    from evomerge.models.checkpoint import parse_dtype
    from evomerge.models.writer import (
        ShardWriter,
        check_destination,
        copy_tokenizer,
        staged_directory,
        write_config,
    )

    out_dir = Path(out_dir)
    keep = (Path(exp_dir),)  # `export E . --force` from inside E must not delete E
    check_destination(out_dir, force, keep)
    view = ExperimentView.load(exp_dir)
    ranked = view.ranked()
    if candidate_id is not None:  # a front member, or any candidate the report names
        place = next((i for i, c in enumerate(ranked) if c.id == candidate_id), None)
        if place is None:
            raise UserError(f"--candidate {candidate_id}: {exp_dir} has no successful candidate with that id")
        rank = place + 1
    if not 1 <= rank <= len(ranked):
        raise UserError(f"--rank {rank}: {exp_dir} has {len(ranked)} successful candidates")
    candidate = ranked[rank - 1]
    recipe = parse_recipe(candidate.recipe)
    if isinstance(recipe, PathRecipe):
        return _export_path(view, candidate, recipe, rank, out_dir, force, keep)
    if isinstance(recipe, ConfigRecipe):
        return _export_config(view, candidate, recipe, rank, out_dir, force, keep)
    base, sources, family = _models(view)
    first = base or sources[0]
    names = merged_names(list(first.tensors), family, tied := first.ties_embeddings(family))
    dtype_name = view.config.get("runtime", {}).get("dtype", "float32")
    dtype = parse_dtype(dtype_name)
    params: dict[str, TensorParams] = recipe.tensor_params(names, family)

    mergekit = recipe_to_mergekit(
        recipe, str(base.path) if base else None, [str(s.path) for s in sources], family, names, dtype_name
    )
    grams, texts = None, None
    if recipe.method.spec.calibrated:  # the search's activation statistics, computed again from the config
        grams, texts = _calibration(view, sources, first, names, dtype)
        mergekit["calibration"] = {"texts": CALIBRATION}
    plan = ConfigPlan(MergeConfig.model_validate(mergekit))
    for name in names:  # the config must mean exactly this recipe, tensor by tensor
        theirs, ours = plan.tensor_params(name, family, first.num_layers), params[name]
        if dict(theirs.values) != dict(ours.values):
            raise RuntimeError(f"internal error: mergekit config differs from the recipe at {name}")

    with staged_directory(out_dir, force, keep) as stage:
        writer = ShardWriter(stage)
        for name in names:
            b = base.get(name, dtype=dtype) if base else None
            inputs = [s.get(name, dtype=dtype) for s in sources]
            if grams is not None:
                merged = recipe.method.spec.exact_calibrated(name, b, inputs, params[name], grams.get(name))
            else:
                merged = merge_tensor(recipe.method, name, b, inputs, params[name])
            writer.add(name, merged.to(dtype))
        writer.finish()
        write_config(stage, first.config, dtype, tied)
        copy_tokenizer(first.path, stage)
        if texts is not None:
            from evomerge.merge.calibration import texts_file

            atomic_write(stage / CALIBRATION, texts_file(texts))
        config_name = rebuild_config_name(recipe)
        how = (
            f"mergekit-yaml {config_name} OUT  (or: evomerge merge {config_name} OUT)"
            if recipe.method.spec.in_mergekit
            else f"evomerge merge {config_name} OUT  ({recipe.method.value} is not in mergekit)"
        )
        atomic_write(
            stage / config_name,
            f"# Rebuilds this model: {how}\n"
            + _dare_note(recipe)
            + yaml.safe_dump(mergekit, sort_keys=False),
        )
        atomic_write(stage / "README.md", model_card(view, candidate, rank, recipe))
    return ExportSummary(out_dir, candidate.id, rank, len(names))


CALIBRATION = "calibration.jsonl"
BEST_CONFIG = "best_config.yaml"


def best_config_yaml(config: dict) -> str:
    """A merge-config candidate as mergekit-evolve writes its best_config.yaml (unset keys left out)."""
    return yaml.safe_dump({k: v for k, v in config.items() if v is not None}, sort_keys=False)


def _export_config(view: ExperimentView, candidate, recipe: ConfigRecipe, rank: int, out_dir: Path, force,
                   keep) -> ExportSummary:  # fmt: skip
    """A migrated mergekit-evolve run's candidate: its merge config (best_config.yaml, as mergekit-evolve
    writes it) run exactly by `evomerge merge`'s path, from the models the search used."""
    import tempfile

    from evomerge.merge.offline import merge_from_config

    _models(view)  # the models are still the ones the search scored
    text = best_config_yaml(recipe.config)
    card = model_card_config(view, candidate, rank, text)
    with tempfile.TemporaryDirectory(prefix="evomerge-export-") as tmp:
        path = Path(tmp) / BEST_CONFIG
        path.write_text(text)
        summary = merge_from_config(
            path, out_dir, force=force, base_dir=view.config_dir, keep=keep,
            extra_files={BEST_CONFIG: text.encode(), "README.md": card.encode()},
        )  # fmt: skip
    return ExportSummary(out_dir, candidate.id, rank, summary.tensors)


def _score_lines(view: ExperimentView, candidate) -> list[str]:
    """A model card's held-out fitness line and its scores table (search split and held-out per task)."""
    heldout = next((f for f in view.finals if f.kind == "evolved" and f.candidate_id == candidate.id), None)
    lines = [f"- held-out fitness: {heldout.fitness:.4f}"] if heldout is not None else []
    lines += ["", "## Scores", "", "| task | search split | held-out |", "|---|---:|---:|"]
    for task in view.tasks:
        h = view.metric(heldout.metrics, task) if heldout else None
        lines.append(f"| {task} | {task_cell(view, candidate, task)} | {'' if h is None else f'{h:.4f}'} |")
    return lines


def model_card_config(view: ExperimentView, candidate, rank: int, text: str) -> str:
    lines = [
        f"# {one_line(view.name)}: evolved merge (candidate {candidate.id}, rank {rank})",
        "",
        "Found by evomerge running a mergekit-evolve config (its genome, CMA-ES), without training.",
        "",
        f"- search-split fitness: {search_fitness(candidate)}",
    ]
    lines += _score_lines(view, candidate)
    lines += ["", f"## Recipe ({BEST_CONFIG}: `mergekit-yaml {BEST_CONFIG} OUT` or `evomerge merge`)", "",
              "```yaml", text.rstrip(), "```", ""]  # fmt: skip
    return "\n".join(lines)


def _calibration(view: ExperimentView, sources, first, names, dtype):
    """(Grams, texts) of a calibrated recipe: the experiment's calibration prompts (its config and task
    split decide them), run through each source on the CPU, as `evomerge merge` does from the texts file."""
    from evomerge.evaluate.evaluator import calibration_prompts
    from evomerge.evaluate.tasks import task_manager
    from evomerge.merge.calibration import model_grams
    from evomerge.models.loading import load_tokenizer

    config = ExperimentConfig.model_validate(view.config)
    spec = config.evaluation
    manager = task_manager([t.name for t in spec.tasks], spec.include_paths)
    tokenizer = load_tokenizer(first)
    calibration = config.merge.calibration
    texts = calibration_prompts(spec, calibration.task, calibration.items, manager, tokenizer)
    return model_grams(sources, tokenizer, texts, set(names), "cpu", dtype), texts


def _models(view: ExperimentView):
    """The models the experiment scored, where it found them; refused when they changed since."""
    return open_recorded(ExperimentConfig.model_validate(view.config), view.config_dir, view.models, view.dir)


HOP_SCALES = "evomerge_hop_scales"


def _export_path(
    view: ExperimentView,
    candidate,
    recipe: PathRecipe,
    rank: int,
    out_dir: Path,
    force: bool,
    keep: tuple[Path, ...],
) -> ExportSummary:
    """A DFS winner as a standard model of A's architecture with one layer per hop (copied from its source).
    A hop's input scale cannot be folded exactly into standard weights (the residual stream carries it
    and RMSNorm's epsilon breaks scale invariance), so the scales go into config.json as
    `evomerge_hop_scales`, which `evomerge.load_model` applies; plain transformers ignores them."""
    from evomerge.models.checkpoint import parse_dtype
    from evomerge.models.writer import ShardWriter, copy_tokenizer, staged_directory, write_config

    _, sources, family = _models(view)
    a = sources[0]
    dtype = parse_dtype(view.config.get("runtime", {}).get("dtype", "float32"))
    path, scales = recipe.path, recipe.scales
    config = dict(a.config)
    config["num_hidden_layers"] = len(path)
    if config.get("layer_types"):
        config["layer_types"] = [sources[s].config["layer_types"][layer] for s, layer in path]
    config[HOP_SCALES] = [float(x) for x in scales]
    ends = _end_tensors(sources, recipe.ends, family, dtype)
    tied = (
        bool(config.get("tie_word_embeddings"))
        and recipe.ends[0] == recipe.ends[1]
        and (sources[recipe.ends[1]].ties_embeddings(family))
    )
    if tied:  # one tensor, as the scored model held it
        for name, _ in family.tied:
            ends.pop(name, None)
    count = 0
    with staged_directory(out_dir, force, keep) as stage:
        writer = ShardWriter(stage)
        for name, tensor in ends.items():
            writer.add(name, tensor)
            count += 1
        for hop, (s, layer) in enumerate(path):
            prefix = f"model.layers.{layer}."
            for name in sources[s].tensors:
                if name.startswith(prefix):
                    writer.add(
                        f"model.layers.{hop}." + name[len(prefix) :], sources[s].get(name, dtype=dtype)
                    )
                    count += 1
        writer.finish()
        write_config(stage, config, dtype, tied)
        copy_tokenizer(a.path, stage)
        atomic_write(stage / "README.md", _path_card(view, candidate, recipe, rank))
    return ExportSummary(out_dir, candidate.id, rank, count)


def _end_tensors(sources, ends: tuple[int, int], family, dtype) -> dict:
    """The tensors outside the layers: the embeddings from source ends[0], final norm and lm_head from
    source ends[1]. A head that a source ties to its embeddings is that source's embedding matrix, which is
    what its lm_head computed with when the candidate was scored."""
    out = {}
    embed, head = sources[ends[0]], sources[ends[1]]
    for name in family.embed:
        if name in embed.tensors:
            out[name] = embed.get(name, dtype=dtype)
    shared = dict(family.tied)
    for name in family.head:
        if name in shared and (name not in head.tensors or head.ties_embeddings(family)):
            out[name] = head.get(shared[name], dtype=dtype)
        elif name in head.tensors:
            out[name] = head.get(name, dtype=dtype)
    return out


def _path_card(view: ExperimentView, candidate, recipe: PathRecipe, rank: int) -> str:
    names = view.sources
    lines = [
        f"# {one_line(view.name)}: evolved data-flow merge (candidate {candidate.id}, rank {rank})",
        "",
        "Found by evomerge's data-flow-space search: no weight was changed; the model is the path of source",
        "layers below, each hop's input hidden state multiplied by its scale.",
        "",
        "Load it with `evomerge.load_model(path)`, which applies the scales stored in config.json",
        f"(`{HOP_SCALES}`); plain `AutoModelForCausalLM.from_pretrained` loads the layers without them.",
        "",
        f"- sources: {', '.join(f'`{one_line(s)}`' for s in view.config['models']['sources'])}",
        f"- embeddings from {names[recipe.ends[0]]}; final norm and lm_head from {names[recipe.ends[1]]}",
        f"- search-split fitness: {search_fitness(candidate)}",
        "",
        "| hop | source | layer | scale |",
        "|---:|---|---:|---:|",
    ]
    for hop, ((s, layer), scale) in enumerate(zip(recipe.path, recipe.scales, strict=True)):
        lines.append(f"| {hop} | {names[s]} | {layer} | {scale:.4f} |")
    return "\n".join(lines) + "\n"


def rebuild_config_name(recipe: Recipe) -> str:
    """mergekit_config.yml where mergekit can run it; evomerge_merge.yml for methods only evomerge has."""
    return "mergekit_config.yml" if recipe.method.spec.in_mergekit else "evomerge_merge.yml"


def _dare_note(recipe: Recipe) -> str:
    if not recipe.method.spec.random:
        return ""
    return (
        f"# {recipe.method.value} drops entries at random: evomerge seeds its masks from the candidate (seed {recipe.seed});\n"
        "# mergekit draws its own, so its rebuild matches in distribution, not bit for bit.\n"
    )


def model_card(view: ExperimentView, candidate, rank: int, recipe: Recipe) -> str:
    models = view.config["models"]
    lines = [
        f"# {one_line(view.name)}: evolved merge (candidate {candidate.id}, rank {rank})",
        "",
        "Found by evomerge, an evolutionary search over merge recipes, without training.",
        "",
        f"- method: `{recipe.method.value}`",
        f"- base: `{one_line(models.get('base'))}`",
        "- sources: " + ", ".join(f"`{one_line(s)}`" for s in models["sources"]),
        f"- optimizer: {view.config.get('optimizer', {}).get('name')} , {len(view.candidates)} evaluations "
        f"(this candidate: generation {candidate.generation}, #{candidate.idx})",
        f"- search-split fitness: {search_fitness(candidate)}",
    ]
    lines += _score_lines(view, candidate)
    lines += ["", "## Recipe", ""]
    names = view.sources
    genes = recipe.method.spec.genes
    cols = [p.name for p in genes if not p.per_input]
    cols += [f"{n} {p.name}" for p in genes if p.per_input for n in names]
    lines += ["| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for g, p in recipe.groups.items():
        values = [p.get(q.name) for q in genes if not q.per_input]
        values += [(p.get(q.name) or (q.default,) * len(names))[j] for q in genes if q.per_input
                   for j in range(len(names))]  # fmt: skip
        lines.append(f"| {g} | " + " | ".join("" if v is None else f"{v:.4f}" for v in values) + " |")
    if recipe.method.spec.in_mergekit:
        rebuild = "`mergekit_config.yml` rebuilds these weights (mergekit-yaml or evomerge merge)."
    else:
        rebuild = (f"`evomerge_merge.yml` rebuilds these weights with `evomerge merge`; mergekit cannot: it has "
                   f"no `{recipe.method.value}`.")  # fmt: skip
    lines += ["", f"{rebuild} The full recipe as JSON:", "", "```json",
              json.dumps(candidate.recipe, indent=1), "```", ""]  # fmt: skip
    return "\n".join(lines)
