"""`evomerge schema` (issue 28): the JSON Schemas of both config kinds, shipped under configs/schema/ and
named on every shipped config's first line for editors; every shipped config valid under its schema, and
configs the validator refuses refused by the schema too."""

import json

import jsonschema
import pytest
import yaml
from helpers import REPO, cli, minimal_config
from pydantic import ValidationError

from evomerge.config import ExperimentConfig
from evomerge.schema import evolve_schema, experiment_schema, merge_schema

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SHIPPED = {"experiment": REPO / "configs" / "schema" / "experiment.json",
           "merge": REPO / "configs" / "schema" / "merge.json",
           "mergekit-evolve": REPO / "configs" / "schema" / "mergekit-evolve.json"}  # fmt: skip
FLAG = {"experiment": [], "merge": ["--merge"], "mergekit-evolve": ["--mergekit-evolve"]}
SCHEMA = {"experiment": experiment_schema, "merge": merge_schema, "mergekit-evolve": evolve_schema}


def test_the_command_prints_the_shipped_schemas():
    for kind, path in SHIPPED.items():
        done = cli("schema", *FLAG[kind])
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        assert printed == json.loads(path.read_text()), f"{path} is stale: evomerge schema > {path}"
        jsonschema.Draft202012Validator.check_schema(printed)
    experiment = experiment_schema()
    optimizer = experiment["properties"]["optimizer"]  # one schema per optimizer, chosen by its name
    assert set(optimizer["discriminator"]["mapping"]) == {
        "cma",
        "m2n2",
        "map_elites",
        "nevergrad",
        "optuna",
        "random",
    }
    assert "tsv_m" in json.dumps(experiment["$defs"]["Method"]["enum"])  # the registry's methods, as an enum
    assert experiment["$defs"]["SpaceSpec"]["properties"]["layers_per_group"]["minimum"] == 1  # ranges


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid_under_the_schema_its_first_line_names(path):
    first = path.read_text().splitlines()[0]
    data = yaml.safe_load(path.read_text())
    kind = "merge" if "merge_method" in data else "mergekit-evolve" if "genome" in data else "experiment"
    assert first == f"# yaml-language-server: $schema=schema/{kind}.json"
    schema = SCHEMA[kind]()
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(data)]
    assert not errors, errors


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": {"name": "simulated_annealing"}},  # no such optimizer
        {"merge": {"method": "frobnicate"}},  # no such method
        {"optimizer": {"name": "cma", "budget": 0}},  # below the range
        {"space": {"layers_per_group": 0}},
        {"evaluation": {"tasks": [{"name": "zoo_math_x"}], "fidelity": {"subsample": {}}}},  # no size
        {
            "evaluation": {
                "tasks": [{"name": "zoo_math_x"}],
                "fidelity": {"subsample": {"items": 4, "eta": 2}},
            }
        },
        {"runtime": {"device": "cpu", "placment": "host"}},  # a misspelt key
        {"output": {"dir": "x"}, "objectives": []},  # an empty list where one is required to hold items
    ],
)
def test_configs_the_validator_refuses_the_schema_refuses(changes):
    config = minimal_config(**changes)
    with pytest.raises(ValidationError):
        ExperimentConfig.model_validate(config)
    errors = list(jsonschema.Draft202012Validator(experiment_schema()).iter_errors(config))
    assert errors, f"the schema accepts {changes}"
