"""YAML as data: the safe loader (no Python objects), with a duplicate key an error instead of the last
value silently winning (a config with `weight:` twice means one of them is a mistake), and a cap on what
anchors and aliases expand to: a kilobyte of nested aliases ("billion laughs") would otherwise become
gigabytes once validated or written back as the experiment's config snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import UserError


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)  # merge keys (<<) first, as SafeLoader does
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (line {line}; first at line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

MAX_NODES = 100_000  # a config is a few hundred nodes; a long mergekit slice list a few thousand


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document holds once every alias is expanded (shared nodes counted each time they
    are used), without expanding anything; ConstructorError past MAX_NODES or on a recursive alias."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise yaml.constructor.ConstructorError(
                None, None, "an alias refers to a node that contains it (recursive)", node.start_mark
            )
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        busy.discard(key)
        if total > MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"anchors and aliases expand to more than {MAX_NODES:,} values; write the config out "
                "without nested aliases",
                node.start_mark,
            )
        sizes[key] = total
        return total

    size(root)
    return sizes[id(root)]


def _single_data(self: _StrictLoader) -> Any:
    node = self.get_single_node()
    if node is None:
        return None
    _expanded_size(node)
    return self.construct_document(node)


_StrictLoader.get_single_data = _single_data


def load_yaml(path: str | Path) -> Any:
    """The YAML document at `path` as plain data; UserError (one line) when missing, unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a config") from None
