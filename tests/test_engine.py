"""The in-memory engine: in-place results equal the functional kernels; memory stays flat; compiled path."""

import gc
import math

import numpy as np
import psutil
import pytest
import torch
from helpers import DEVICE

from evomerge.merge.engine import MergeEngine
from evomerge.merge.kernels.trim import keep_count
from evomerge.merge.methods import Method, merge_tensor
from evomerge.merge.recipe import GroupParams, Recipe
from evomerge.models.checkpoint import Checkpoint
from evomerge.models.loading import load_target

# every method the engine merges without data (RegMean's activation statistics: tests/test_regmean.py)
UNCALIBRATED = [m for m in Method if not m.spec.calibrated]


def _engine(paths, method, exact=False, compile=False, placement="device", device=DEVICE):
    spec = method.spec
    base, *fts = [Checkpoint.open(p) for p in paths]
    inputs = fts
    if not (spec.needs_base or spec.optional_base):  # linear, karcher, passthrough: the models themselves
        base, inputs = None, [Checkpoint.open(p) for p in paths]
    if spec.inputs is not None:
        inputs = inputs[: spec.inputs]
    target = load_target(inputs[0] if base is None else base, device=device)
    engine = MergeEngine(
        base, inputs, method, target, exact=exact, compile=compile, placement=placement, device=device
    )
    return engine, target


def _varied_recipe(engine, method, rng, seed=0, split=False):
    """Different parameters in every group, as a search would propose."""
    n = len(engine.inputs)
    groups = {}
    spec = method.spec
    for name in engine.family.group_names(engine.num_layers, split=split):
        values = {}
        for p in spec.genes:  # every searchable parameter, drawn inside its default range
            low, high = max(p.gene[0], 0.2) if p.name in ("weight", "density") else p.gene[0], p.gene[1]
            drawn = [float(v) for v in rng.uniform(low, high, n if p.per_input else 1)]
            values[p.name] = tuple(drawn) if p.per_input else drawn[0]
        groups[name] = GroupParams(spec.repair(values) if spec.repair else values)
    return Recipe(method, groups, seed=seed)


def _functional(engine, recipe):
    params = recipe.tensor_params(engine.names, engine.family)
    base = engine.base
    return {
        name: merge_tensor(
            engine.method, name, base[name] if base else None, [s[name] for s in engine.inputs], params[name]
        )
        for name in engine.names
    }


@pytest.mark.parametrize("method", UNCALIBRATED)
@pytest.mark.parametrize("split", [False, True])
def test_in_place_equals_functional(zoo, method, split):

    engine, target = _engine(zoo["llama"], method)
    recipe = _varied_recipe(engine, method, np.random.default_rng(0), seed=42, split=split)
    engine.apply(recipe)
    expected = _functional(engine, recipe)
    state = target.state_dict()
    for name, value in expected.items():
        # tiny tensors: the TIES threshold tables hold every magnitude, so the fast path is exact too;
        # multislerp's drops the exact kernel's tangent, zero but for rounding (see its module)
        if method is Method.multislerp:
            torch.testing.assert_close(state[name], value.to(state[name].dtype), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(state[name], value.to(state[name].dtype)), name


@pytest.mark.parametrize("method", UNCALIBRATED)
def test_host_sources_merge_bit_identically(zoo, method):
    """`runtime.placement: host`: every tensor's inputs (and precomputed state) go through the reusable
    staging buffers; the merged target is the same bits as with the sources resident on the device."""
    host, host_target = _engine(zoo["qwen2"], method, placement="host")
    device, device_target = _engine(zoo["qwen2"], method)
    assert host._stager is not None and device._stager is None

    def same_bits(got, want, name):
        assert torch.equal(got, want), name

    _merge_both(host, host_target, device, device_target, method, np.random.default_rng(3), same_bits)
    host.load_input(0)
    assert torch.equal(host_target.state_dict()[host.names[0]], host.inputs[0][host.names[0]])


@pytest.mark.skipif(DEVICE == "cpu", reason="compares the test device (EVOMERGE_TEST_DEVICE) against the CPU")
@pytest.mark.parametrize("method", UNCALIBRATED)
def test_merge_on_the_test_device_equals_the_cpu(zoo, method):
    """A recipe merges to the same model on a GPU as on the CPU (a Ray cluster may mix them): the hashed
    masks (DARE, DELLA, TIES' tie-breaks) are drawn per entry index, not from a device's RNG, so they are the
    same entries everywhere; the arithmetic may differ by rounding only."""
    here, here_target = _engine(zoo["llama"], method)
    cpu, cpu_target = _engine(zoo["llama"], method, device="cpu")

    def close(got, want, name):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    _merge_both(here, here_target, cpu, cpu_target, method, np.random.default_rng(5), close)


def _merge_both(engine, target, reference, reference_target, method, rng, check) -> None:
    """Two engines merge the same varied recipes (the second with split groups); `check(got, want, name)`
    compares each tensor of `target` with the reference's."""
    for seed in range(2):
        recipe = _varied_recipe(reference, method, rng, seed=seed, split=seed == 1)
        engine.apply(recipe)
        reference.apply(recipe)
        for name, value in reference_target.state_dict().items():
            check(target.state_dict()[name], value, name)


def test_split_groups_give_attention_and_mlp_their_own_parameters(zoo):
    engine, target = _engine(zoo["mistral"], Method.task_arithmetic)
    groups = {
        g: GroupParams(weight=(0.0, 0.0)) for g in engine.family.group_names(engine.num_layers, split=True)
    }
    groups["layers.1.mlp"] = GroupParams(weight=(1.0, 0.0))
    engine.apply(Recipe(Method.task_arithmetic, groups))
    ft1 = Checkpoint.open(zoo["mistral"][1])
    base = Checkpoint.open(zoo["mistral"][0])
    for name in engine.names:
        want = ft1 if name.startswith("model.layers.1.") and engine.family.part(name) == "mlp" else base
        assert torch.allclose(target.state_dict()[name], want.get(name).to(DEVICE), atol=1e-6), name


def test_fast_ties_keeps_within_0_1_percent_on_large_tensors(tmp_path):
    from evomerge.models.synthetic import make_family

    paths = make_family(tmp_path, "llama", hidden=256, layers=1, finetunes=2, seed=5)
    engine, target = _engine(paths, Method.ties)
    exact_engine, exact_target = _engine(paths, Method.ties, exact=True)
    recipe = Recipe.uniform(
        Method.ties, engine.family.group_names(1), weights=[0.6, 0.4], densities=[0.2, 0.45]
    )
    engine.apply(recipe)
    exact_engine.apply(recipe)
    name = "model.layers.0.mlp.up_proj.weight"  # 131k entries: the table samples ranks, not every magnitude
    assert engine.state[name][0][0].values.size < engine.state[name][0][0].numel
    base = engine.base[name]
    for j, density in enumerate((0.2, 0.45)):
        delta = engine.inputs[j][name] - base
        value, q = engine.state[name][0][j].threshold(density)
        kept = int((delta.abs() > value).sum()) + (int((delta.abs() == value).sum()) if q > 0 else 0)
        assert (
            abs(kept - keep_count(density, delta.numel())) <= 0.001 * keep_count(density, delta.numel()) + 1
        )
    fast, exact = target.state_dict()[name], exact_target.state_dict()[name]
    assert (fast != exact).float().mean().item() < 0.002  # differs only at the trim boundary


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("method", [Method.ties, Method.dare_ties, Method.slerp])
def test_memory_flat_over_50_candidates(zoo, method):

    engine, target = _engine(zoo["qwen2"], method)
    rng = np.random.default_rng(1)
    engine.apply(_varied_recipe(engine, method, rng, seed=0))  # warm-up allocations
    before = _rss()
    for i in range(50):
        engine.apply(_varied_recipe(engine, method, rng, seed=i))
    grown = _rss() - before
    assert grown < 2 * 1024**2, f"RSS grew by {grown / 1e6:.1f} MB over 50 candidates"
    assert all(math.isfinite(v) for v in target.state_dict()["model.norm.weight"].tolist())


@pytest.mark.slow
def test_compiled_kernels_match_eager(zoo):
    """torch.compile path (what large models and GPUs use) gives the same tensors as the eager path."""

    for method in (Method.dare_ties, Method.ties, Method.della):  # della: two compiled passes, packed ranks
        eager, eager_target = _engine(zoo["llama"], method, compile=False)
        compiled, compiled_target = _engine(zoo["llama"], method, compile=True)
        recipe = _varied_recipe(eager, method, np.random.default_rng(3), seed=9)
        eager.apply(recipe)
        compiled.apply(recipe)
        assert compiled.kernels.compile, "compilation fell back to eager"
        a, b = eager_target.state_dict(), compiled_target.state_dict()
        for name in eager.names:
            assert torch.allclose(a[name], b[name], rtol=1e-6, atol=1e-6), name


def test_dare_mask_depends_on_candidate_seed_only(zoo):
    engine, target = _engine(zoo["llama"], Method.dare_linear)
    groups = engine.family.group_names(engine.num_layers)

    def recipe(seed):
        return Recipe.uniform(Method.dare_linear, groups, weights=[0.5, 0.5], densities=[0.5, 0.5], seed=seed)

    name = "model.layers.0.self_attn.q_proj.weight"
    engine.apply(recipe(1))
    first = target.state_dict()[name].clone()
    torch.manual_seed(12345)  # global RNG state must not matter
    engine.apply(recipe(2))
    engine.apply(recipe(1))
    assert torch.equal(target.state_dict()[name], first)
    engine.apply(recipe(2))
    assert not torch.equal(target.state_dict()[name], first)


@pytest.mark.parametrize("with_base", [True, False])
def test_fast_multislerp_equals_exact_up_to_rounding(zoo, with_base):
    """The search's one-pass multislerp (norms and Gram matrix precomputed) against the exact kernel, on
    three models, with a base (task vectors) and without (the models themselves)."""
    base, *fts = [Checkpoint.open(p) for p in zoo["mistral"]]
    inputs = fts if with_base else [base, *fts]
    target = load_target(inputs[0], device=DEVICE)
    engine = MergeEngine(
        base if with_base else None, inputs, Method.multislerp, target, compile=False, device=DEVICE
    )
    exact_target = load_target(inputs[0], device=DEVICE)
    exact = MergeEngine(
        base if with_base else None, inputs, Method.multislerp, exact_target, exact=True, device=DEVICE
    )
    weights = (0.7, 0.2, 0.5)[: len(inputs)]
    recipe = Recipe.uniform(Method.multislerp, engine.family.group_names(engine.num_layers), weights=weights)
    engine.apply(recipe)
    exact.apply(recipe)
    for name in engine.names:
        torch.testing.assert_close(
            target.state_dict()[name], exact_target.state_dict()[name], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "method", [Method.breadcrumbs, Method.breadcrumbs_ties, Method.della, Method.della_linear]
)
def test_fast_trims_on_large_tensors(tmp_path, method):
    """The search's paths on tensors too large for every magnitude to be kept: DELLA (precomputed row
    ranks) gives the exact kernel's bits; breadcrumbs (two threshold cuts) differs from the exact sort
    only at the cuts."""
    from evomerge.models.synthetic import make_family

    paths = make_family(tmp_path, "llama", hidden=256, layers=1, finetunes=2, seed=5)
    engine, target = _engine(paths, method)
    exact_engine, exact_target = _engine(paths, method, exact=True)
    values = {"gamma": (0.02, 0.05)} if "breadcrumbs" in method.value else {"epsilon": (0.1, 0.05)}
    recipe = Recipe.uniform(
        method, engine.family.group_names(1), weights=[0.6, 0.4], densities=[0.3, 0.6], values=values, seed=3
    )
    engine.apply(recipe)
    exact_engine.apply(recipe)
    name = "model.layers.0.mlp.up_proj.weight"  # 131k entries
    fast, exact = target.state_dict()[name], exact_target.state_dict()[name]
    if method.spec.random:
        assert torch.equal(fast, exact)
    else:
        assert engine.state[name][0][0].values.size < engine.state[name][0][0].numel  # sampled ranks
        assert 0 < (fast != exact).float().mean().item() < 0.002


@pytest.mark.parametrize("method", [Method.breadcrumbs, Method.breadcrumbs_ties])
def test_fast_breadcrumbs_rescale(zoo, tmp_path, method):
    """Breadcrumbs with `rescale` on the search's path (band L1 norms, then the merge pass): on small
    tensors, where the threshold tables hold every magnitude, the exact kernel's bits, for varied recipes
    with some task vectors kept whole; on large ones, the exact sort's result but at the cuts, and so
    close in norm; compiled, the eager result up to rounding."""
    from dataclasses import replace

    from evomerge.models.synthetic import make_family

    engine, target = _engine(zoo["llama"], method)
    exact_engine, exact_target = _engine(zoo["llama"], method, exact=True)
    rng = np.random.default_rng(7)
    for seed in range(3):
        recipe = replace(_varied_recipe(engine, method, rng, seed=seed, split=seed == 1), rescale=True)
        if seed == 2:  # the first task vector kept whole: not rescaled
            recipe.groups["embed"] = GroupParams({**recipe.groups["embed"].values, "density": (1.0, 0.4)})
        engine.apply(recipe)
        exact_engine.apply(recipe)
        plain = replace(recipe, rescale=False)
        for name in engine.names:
            assert torch.equal(target.state_dict()[name], exact_target.state_dict()[name]), (seed, name)
        exact_engine.apply(plain)
        assert not torch.equal(
            target.state_dict()[engine.names[1]], exact_target.state_dict()[engine.names[1]]
        )

    compiled, compiled_target = _engine(zoo["llama"], method, compile=True)
    compiled.apply(recipe)
    engine.apply(recipe)
    assert compiled.kernels.compile, "compilation fell back to eager"
    for name in engine.names:
        torch.testing.assert_close(
            compiled_target.state_dict()[name], target.state_dict()[name], rtol=1e-5, atol=1e-6
        )

    paths = make_family(tmp_path, "llama", hidden=256, layers=1, finetunes=2, seed=5)
    large, large_target = _engine(paths, method)
    large_exact, large_exact_target = _engine(paths, method, exact=True)
    recipe = Recipe.uniform(
        method, large.family.group_names(1), weights=[0.6, 0.4], densities=[0.3, 0.6],
        values={"gamma": (0.02, 0.05)}, rescale=True, seed=3,
    )  # fmt: skip
    large.apply(recipe)
    large_exact.apply(recipe)
    name = "model.layers.0.mlp.up_proj.weight"  # 131k entries: sampled ranks
    fast, exact = large_target.state_dict()[name], large_exact_target.state_dict()[name]
    # the kept sets differ at the cuts, so the L1 factors differ slightly: elsewhere a rounding-sized change
    far = ~torch.isclose(fast, exact, rtol=1e-2, atol=1e-7)
    assert 0 < far.float().mean().item() < 0.002
    assert (fast - exact).norm() < 0.01 * exact.norm()


def test_della_state_estimate_matches_what_the_engine_keeps(zoo):
    """The memory plan's figure for DELLA's precomputed state (packed row ranks, one L1 norm per task
    vector) is what the engine holds, to the few bytes an odd-sized tensor's packing rounds up."""
    from evomerge.merge.methods._gta import della_state_bytes

    engine, _ = _engine(zoo["llama"], Method.della)
    inputs = len(engine.inputs)
    held = estimate = 0
    for name in engine.names:
        packed, _, norms = engine.state[name]
        held += sum(p.numel() * p.element_size() for p in packed) + norms.numel() * norms.element_size()
        shape = engine.base[name].shape
        estimate += della_state_bytes(shape.numel(), shape[-1], inputs)
        assert all(p.numel() == (shape.numel() + 1) // 2 for p in packed) or shape.numel() < 2  # 2 per word
    assert held <= estimate <= held + 4 * inputs * len(engine.names)
    assert della_state_bytes(1 << 30, 4096, 2) == 2 * ((1 << 30) * 4 + 4)  # a tensor of one rng chunk or more
