"""The experiment config: strict schema (one line per problem), `evomerge validate`."""

import pytest
import yaml
from helpers import REPO, SMOKE, minimal_config
from helpers import cli as _cli
from helpers import smoke as _smoke

from evomerge.config import parse_config
from evomerge.errors import UserError

# -- schema -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"space": {"density": {"min": 0}}}, "space.density.min: must be in (0, 1]"),
        ({"space": {"weight": {"min": 2, "max": 1}}}, "space.weight: min (2.0) is above max (1.0)"),
        ({"space": {"layer_per_group": 2}}, "space.layer_per_group: unknown key"),
        ({"optimizer": {"name": "cma", "sigma0": "big"}}, "optimizer.sigma0: Input should be a valid number"),
        (
            {"optimizer": {"name": "cma", "popsize": 1}},
            "optimizer.popsize: Input should be greater than or equal to 2",
        ),
        ({"optimizer": {"name": "bayes"}}, "optimizer: Input tag 'bayes' found using 'name' does not match"),
        ({"merge": {"method": "slerp"}}, "slerp merges models.base with exactly one source"),
        ({"models": {"sources": ["a"]}}, "needs models.base"),
        ({"evaluation": {"tasks": []}}, "evaluation.tasks: List should have at least 1 item"),
        (
            {"runtime": {"dtype": "int8"}},
            "runtime.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'",
        ),
    ],
)
def test_schema_names_the_key(changes, message):
    with pytest.raises(UserError) as err:
        parse_config(minimal_config(**changes))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_validate_cli_ok_and_bad(tmp_path):
    done = _cli("validate", SMOKE)
    assert done.returncode == 0, done.stderr
    assert "16 genes" in done.stdout and "valid" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal_config(space={"density": {"min": 1.5}})))
    done = _cli("validate", bad)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {bad}: space.density.min: must be in (0, 1]"]
    missing = _smoke(tmp_path, **{"models.sources": [str(tmp_path / "nope"), str(REPO / "zoo" / "lang-x")]})
    done = _cli("validate", missing)
    assert done.returncode == 2 and "model directory not found" in done.stderr


def test_validate_points_a_merge_config_to_evomerge_merge():
    done = _cli("validate", REPO / "configs" / "example-ties.yaml")
    assert (
        done.returncode == 2
        and "is a mergekit merge config" in done.stderr
        and "evomerge merge" in done.stderr
    )


@pytest.mark.slow
def test_validate_unknown_task_suggests(tmp_path):
    done = _cli(
        "validate",
        _smoke(tmp_path, evaluation={"tasks": [{"name": "zoo_math_xx"}], "split": {"heldout": 300}}),
    )
    assert done.returncode == 2
    assert "unknown task 'zoo_math_xx'" in done.stderr and "zoo_math_x" in done.stderr


def test_validate_hub_models_unchecked_offline(tmp_path):
    done = _cli("validate", REPO / "configs" / "evollm-jp.yaml")
    assert done.returncode == 0, done.stderr
    assert "unchecked" in done.stdout


def test_config_loads_without_torch():
    """The config schema reads the method registry; neither imports torch (kernels load on first use)."""
    import subprocess
    import sys

    code = "import sys, evomerge.config; from evomerge.merge.methods import REGISTRY; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
