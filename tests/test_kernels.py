"""Kernel behaviour that the mergekit comparison cannot show: DARE statistics, RNG, SLERP edges, trimming."""

import math

import pytest
import torch

from evomerge.merge import kernels
from evomerge.merge.kernels.gta import gta_apply
from evomerge.merge.kernels.rng import derive_key, mix32, uniform_from_index, uniform_table
from evomerge.merge.kernels.trim import ThresholdTable, keep_above, keep_count, strict_thresholds, topk_mask


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return x


def test_hash_matches_pure_python_reference():
    key = derive_key(123, "model.layers.0.mlp.up_proj.weight", 1)
    idx = torch.tensor([0, 1, 2, 1000, 2**31 - 1], dtype=torch.int32)
    got = (mix32(idx ^ key).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert got == [_lowbias32(int(i) ^ (key & 0xFFFFFFFF)) for i in idx.tolist()]


def test_uniform_is_uniform_and_keys_are_independent():
    idx = torch.arange(1_000_000, dtype=torch.int32)
    u = uniform_from_index(idx, derive_key(1))
    v = uniform_from_index(idx, derive_key(2))
    assert abs(u.mean().item() - 0.5) < 2e-3
    assert abs((u < 0.1).float().mean().item() - 0.1) < 2e-3
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 5e-3
    assert 0 <= u.min().item() and u.max().item() < 1


def _dare_inputs(n=400_000):
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(n)  # exact recovery of the kept deltas below
    delta = torch.randn(n, generator=g) * 0.01
    return base, delta


def test_dare_drop_rate_and_rescale():
    base, delta = _dare_inputs()
    for density in (0.1, 0.5, 0.9):
        out = kernels.dare_linear(base, [base + delta], [1.0], [density], [derive_key(5)])
        kept_delta = out - base
        kept = kept_delta != 0
        assert abs(kept.float().mean().item() - density) < 0.005
        # survivors are rescaled by exactly 1/density
        ratio = kept_delta[kept] / delta[kept]
        assert torch.allclose(ratio, torch.full_like(ratio, 1 / density), rtol=1e-3)
        # so the task vector's sum is preserved in expectation (mergekit rescales by the L1 ratio instead)
        assert abs(kept_delta.abs().sum().item() / delta.abs().sum().item() - 1) < 0.02


def test_dare_same_key_same_mask_different_key_different_mask():
    base, delta = _dare_inputs(50_000)
    a = kernels.dare_ties(base, [base + delta, base - delta], [1.0, 0.5], [0.5, 0.5], [11, 12])
    b = kernels.dare_ties(base, [base + delta, base - delta], [1.0, 0.5], [0.5, 0.5], [11, 12])
    c = kernels.dare_ties(base, [base + delta, base - delta], [1.0, 0.5], [0.5, 0.5], [13, 12])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_density_one_is_task_arithmetic():
    base, delta = _dare_inputs(10_000)
    models = [base + delta, base + 2 * delta]
    dare = kernels.dare_linear(base, models, [0.3, 0.7], [1.0, 1.0], [1, 2])
    ta = kernels.task_arithmetic.task_arithmetic(base, models, [0.3, 0.7])
    assert torch.equal(dare, ta)


def test_ties_sign_election_and_disjoint_mean():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 0.0])
    b = torch.tensor([3.0, 1.0, -1.0, 0.0])
    out = kernels.ties.ties(base, [a, b], [1.0, 1.0], [1.0, 1.0])
    # entry 0: both positive -> mean 2; entry 1: -2 vs +1, sum -1 -> negative wins -> -2
    # entry 2: 3 vs -1 -> positive -> 3; entry 3: nothing agrees -> 0
    assert out.tolist() == [2.0, -2.0, 3.0, 0.0]


def test_topk_mask_keeps_exact_count():
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(3))
    for density in (0.01, 0.3, 0.77):
        mask = topk_mask(x, density)
        assert mask.sum().item() == keep_count(density, x.numel())
        assert x[mask].abs().min() >= x[~mask].abs().max()


def test_threshold_table_kept_count_within_0_1_percent():
    g = torch.Generator().manual_seed(0)
    # heavy-tailed task vector stored in bf16 (many tied magnitudes), as real fine-tunes are
    x = (
        (torch.randn(2_000_000, generator=g) * torch.exp(torch.randn(2_000_000, generator=g)))
        .bfloat16()
        .float()
    )
    table = ThresholdTable(x.abs())
    assert table.nbytes < 600_000
    u = uniform_from_index(torch.arange(x.numel(), dtype=torch.int32), derive_key("ties"))
    for density in (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        value, tie_fraction = table.threshold(density)
        kept = keep_above(x.abs(), value, tie_fraction, u).sum().item()
        exact = keep_count(density, x.numel())
        assert abs(kept - exact) <= 0.001 * exact, (density, kept, exact)
    assert keep_above(x.abs(), *table.threshold(1.0), u).all()


def test_small_tensor_table_is_exact():
    x = torch.randn(500, generator=torch.Generator().manual_seed(1))
    table = ThresholdTable(x.abs())
    u = torch.zeros(500)
    for density in (0.1, 0.5, 0.93):
        assert keep_above(x.abs(), *table.threshold(density), u).sum().item() == keep_count(density, 500)


def test_merge_pass_keeps_exactly_what_keep_above_keeps():
    """The merge pass decides with float arithmetic (sign, relu) instead of compares: on bf16-tied task
    vectors, with the hash in the pass, with precomputed uniforms and with strict thresholds, it keeps
    the entries keep_above keeps, and merges them to the same bits as a select would."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50_000, generator=g).bfloat16().float()
    deltas = [(torch.randn(50_000, generator=g) * 0.01).bfloat16().float() for _ in range(2)]
    models = [base + d for d in deltas]
    weights = [0.7, 0.4]
    keys = [derive_key("ties", j) for j in range(2)]
    tables = [ThresholdTable((m - base).abs()) for m in models]
    for density in (0.1, 0.37, 0.8):
        cuts = [t.threshold(density) for t in tables]
        assert any(0 < q < 1 for _, q in cuts)  # real ties at the threshold
        common = dict(mode="threshold", consensus=False, normalize=False, thresholds=[c[0] for c in cuts])
        hashed = gta_apply(torch.empty(50_000), base, models, weights, **common,
                           tie_probs=[c[1] for c in cuts], keys=keys)  # fmt: skip
        tabled = gta_apply(torch.empty(50_000), base, models, weights, **common,
                           tie_probs=[c[1] for c in cuts], keys=keys,
                           uniforms=[uniform_table(k, 50_000) for k in keys])  # fmt: skip
        kept = [
            keep_above((m - base).abs(), v, q, uniform_from_index(torch.arange(50_000, dtype=torch.int32), k))
            for m, (v, q), k in zip(models, cuts, keys, strict=True)
        ]
        selected = base + sum(
            torch.where(k, (m - base) * w, 0.0) for k, m, w in zip(kept, models, weights, strict=True)
        )
        assert torch.equal(hashed, selected) and torch.equal(tabled, selected)
    # no fractional tie: one plain compare with moved thresholds keeps the same entries
    cuts = [(float(deltas[0].abs().median()), 1.0), (float(deltas[1].abs().median()), 0.0)]
    strict = strict_thresholds(cuts)
    assert strict is not None and strict_thresholds([(0.1, 0.5)]) is None
    plain = gta_apply(torch.empty(50_000), base, models, weights, mode="threshold", consensus=False,
                      normalize=False, thresholds=strict)  # fmt: skip
    hashed = gta_apply(torch.empty(50_000), base, models, weights, mode="threshold", consensus=False,
                       normalize=False, thresholds=[c[0] for c in cuts], tie_probs=[c[1] for c in cuts], keys=keys)  # fmt: skip
    assert torch.equal(plain, hashed)


def test_slerp_endpoints_and_colinear_fallback():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert torch.allclose(kernels.slerp.slerp(0.0, a, b), a, atol=1e-6)
    assert torch.allclose(kernels.slerp.slerp(1.0, a, b), b, atol=1e-6)
    mid = kernels.slerp.slerp(0.5, a, b)
    # on the sphere: the midpoint of two (nearly) orthogonal same-norm vectors keeps their norm, lerp does not
    assert mid.norm() > ((a + b) / 2).norm() * 1.2
    colinear = kernels.slerp.slerp(0.25, a, 2 * a)
    assert torch.allclose(colinear, 0.75 * a + 0.25 * 2 * a, atol=1e-6)
    zero = kernels.slerp.slerp(0.5, torch.zeros(10), torch.ones(10))
    assert torch.isfinite(zero).all()


def test_linear_normalize():
    a, b = torch.ones(3), torch.full((3,), 3.0)
    assert kernels.linear.linear([a, b], [1.0, 3.0]).tolist() == [2.5] * 3
    assert kernels.linear.linear([a, b], [1.0, 3.0], normalize=False).tolist() == [10.0] * 3
    assert not math.isnan(kernels.linear.linear([a, b], [0.5, 0.5])[0].item())


def test_della_magprune_keeps_by_rank_in_expectation():
    """DELLA's mask: a row's smallest magnitudes kept with probability density - epsilon, its largest with
    density + epsilon, on average density; survivors rescaled to the row vector's L1 norm (mergekit)."""
    from evomerge.merge.kernels.sparsify import l1_rescale, magprune_mask

    g = torch.Generator().manual_seed(5)
    delta = torch.randn(64, 4096, generator=g)
    mask = magprune_mask(delta, 0.4, 0.15, key=derive_key("della", 0))
    assert abs(mask.mean().item() - 0.4) < 0.01
    order = delta.abs().argsort(dim=1)
    low = mask.gather(1, order[:, :400]).mean().item()
    high = mask.gather(1, order[:, -400:]).mean().item()
    assert abs(low - 0.25) < 0.03 and abs(high - 0.55) < 0.03
    assert torch.equal(
        mask, magprune_mask(delta, 0.4, 0.15, key=derive_key("della", 0))
    )  # keyed, not global RNG
    assert not torch.equal(mask, magprune_mask(delta, 0.4, 0.15, key=derive_key("della", 1)))
    factor = l1_rescale(delta, mask)
    assert (delta * mask * factor).abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


def test_breadcrumbs_mask_drops_outliers_and_smallest():
    from evomerge.merge.kernels.sparsify import outlier_mask

    delta = torch.arange(1, 1001, dtype=torch.float32).reshape(10, 100)  # magnitudes 1..1000
    mask = outlier_mask(delta, density=0.5, gamma=0.1)
    kept = delta[mask.bool()]
    assert kept.numel() == 500 and kept.min().item() == 401 and kept.max().item() == 900
