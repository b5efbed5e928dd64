"""Check, before any merge work, that checkpoints can be merged tensor by tensor."""

from __future__ import annotations

from collections.abc import Sequence

from evomerge.errors import UserError
from evomerge.models.architecture import FAMILIES, Family, family_for
from evomerge.models.checkpoint import Checkpoint


def check_compatible(models: Sequence[Checkpoint], *, same_depth: bool = True) -> Family:
    """Same family, same tensor names and shapes; returns the family. Raises UserError naming the first problem.
    `same_depth=False` (frankenmerge slices): the layer counts may differ; every layer must still have the
    same tensors and shapes as every other model's layers."""
    if not models:
        raise UserError("no models to merge")
    first = models[0]
    try:
        family = family_for(first.model_type)
    except KeyError:
        raise UserError(
            f"model {first.ref}: architecture {first.model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
        ) from None
    for model in models:
        _check_layers_stored(model, family)
    for other in models[1:]:
        if other.model_type != first.model_type:
            raise UserError(
                f"models {first.ref} and {other.ref} are different architectures ({first.model_type} vs {other.model_type})"
            )
        _check_vocab(first, other, family)
        if not same_depth:
            _check_layers(first, other, family)
            continue
        for name, info in first.tensors.items():
            theirs = other.tensors.get(name)
            if theirs is None:
                raise UserError(f"tensor {name} is in {first.ref} but missing from {other.ref}")
            if theirs.shape != info.shape:
                raise UserError(
                    f"tensor {name} has shape {list(info.shape)} in {first.ref} but {list(theirs.shape)} in {other.ref}"
                )
        extra = next((name for name in other.tensors if name not in first.tensors), None)
        if extra is not None:
            raise UserError(f"tensor {extra} is in {other.ref} but missing from {first.ref}")
    for name in first.tensors:
        try:
            family.group(name)
        except ValueError as exc:
            raise UserError(f"model {first.ref}: {exc}") from None
    return family


def _check_layers_stored(model: Checkpoint, family: Family) -> None:
    """The weights hold every tensor of every layer config.json declares, and no other layer: transformers
    would initialise a missing tensor at random (and say nothing) and drop an extra one."""
    import re

    per_layer: dict[int, set[str]] = {}
    for name in model.tensors:
        index = family.layer_index(name)
        if index is not None:
            per_layer.setdefault(index, set()).add(re.sub(family.layer_pattern, "", name, count=1))
    count = model.num_layers
    extra = sorted(i for i in per_layer if i >= count)
    if extra:
        raise UserError(
            f"model {model.ref}: config.json declares {count} layers but the weights also hold layer {extra[0]}"
        )
    suffixes = set().union(*per_layer.values()) if per_layer else set()
    for i in range(count):
        missing = sorted(suffixes - per_layer.get(i, set()))
        if missing or i not in per_layer:
            example = f"model.layers.{i}.{missing[0]}" if missing else f"model.layers.{i}.*"
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise UserError(
                f"model {model.ref}: config.json declares {count} layers but the weights lack {example}{more}"
                " (transformers would initialise it at random)"
            )


def _check_vocab(a: Checkpoint, b: Checkpoint, family: Family) -> None:
    embed = family.embed[0]
    if embed not in a.tensors or embed not in b.tensors:
        return
    va, vb = a.tensors[embed].shape[0], b.tensors[embed].shape[0]
    if va != vb:
        raise UserError(
            f"vocabulary sizes differ: {a.ref} has {va} embedding rows, {b.ref} has {vb}; resize both to the same "
            f"vocabulary first (e.g. model.resize_token_embeddings({max(va, vb)}) on the smaller one, then save_pretrained)"
        )


def _layout(model: Checkpoint, family: Family) -> dict[str, tuple]:
    """Tensor name -> shape, with every layer's tensors folded into one `layers.*.<suffix>` entry."""
    import re

    out: dict[str, tuple] = {}
    for name, info in model.tensors.items():
        key = re.sub(family.layer_pattern, "layers.*.", name, count=1)
        if out.setdefault(key, tuple(info.shape)) != tuple(info.shape):
            raise UserError(
                f"model {model.ref}: {name} has shape {list(info.shape)}, its other layers {list(out[key])}"
            )
    return out


def _check_layers(a: Checkpoint, b: Checkpoint, family: Family) -> None:
    mine, theirs = _layout(a, family), _layout(b, family)
    for key, shape in mine.items():
        if key not in theirs:
            raise UserError(f"tensor {key} is in {a.ref} but missing from {b.ref}")
        if theirs[key] != shape:
            raise UserError(
                f"tensor {key} has shape {list(shape)} in {a.ref} but {list(theirs[key])} in {b.ref}"
            )
    extra = next((key for key in theirs if key not in mine), None)
    if extra is not None:
        raise UserError(f"tensor {extra} is in {b.ref} but missing from {a.ref}")
