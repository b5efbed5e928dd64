"""JSON Schemas of the config kinds, from their pydantic models (the one source of their keys, types,
enums, ranges and descriptions): editors with a YAML language server complete and check configs as
people type (`# yaml-language-server: $schema=...` on a config's first line)."""

from __future__ import annotations

from typing import Any

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def experiment_schema() -> dict[str, Any]:
    """The schema of `evomerge search` configs (ExperimentConfig)."""
    from evomerge.config import ExperimentConfig

    return _titled(ExperimentConfig.model_json_schema(), "evomerge experiment config (evomerge search)")


def merge_schema() -> dict[str, Any]:
    """The schema of `evomerge merge` configs (mergekit's format with evomerge's extensions)."""
    from evomerge.merge.mergekit_config import MergeConfig

    return _titled(MergeConfig.model_json_schema(), "evomerge merge config (mergekit format)")


def evolve_schema() -> dict[str, Any]:
    """The schema of mergekit-evolve configs as evomerge takes them (`evomerge search evolve.yml`)."""
    from evomerge.migrate import EvolveConfig

    return _titled(EvolveConfig.model_json_schema(), "mergekit-evolve config (as evomerge runs it)")


def _titled(schema: dict[str, Any], title: str) -> dict[str, Any]:
    return {"$schema": SCHEMA_DIALECT, "title": title, **{k: v for k, v in schema.items() if k != "title"}}
