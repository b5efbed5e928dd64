"""Data-free merges that work in the singular subspaces of the task vectors (2025): TSV-M, Iso-C, Iso-CTS
and WUDI. Each returns the merged *task vector* of one tensor (float32); the method adds it to the base,
scaled by the searched factor, so the expensive part (SVDs, WUDI's optimisation) does not depend on the
candidate and is computed once.

Semantics are FusionBench 0.2.33's (its functions are the test oracle): only 2-D tensors that are not
excluded get the subspace treatment; every other tensor (1-D norms and biases, excluded keys) gets the
mean of the task vectors. SVDs run in float32 (or float64 when the inputs are), on the tensors' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def mean_tv(tvs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The running mean FusionBench gives non-matrix tensors (m_i = m_{i-1} + (x_i - m_{i-1}) / i)."""
    out = _f32(tvs[0]).clone()
    for i, tv in enumerate(tvs[1:], start=2):
        out += (_f32(tv) - out) / i
    return out


def tsv_rank(shape: Sequence[int], count: int) -> int:
    """Singular directions TSV-M keeps per task vector: an equal share of the tensor's rank."""
    return int(min(shape) * (1 / count))


def tsv_m(tvs: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025): each task vector's top rank/T singular triplets, side by side;
    the stacked left and right singular vectors are whitened (replaced by their nearest orthogonal
    matrices, U V^T of their own SVD) and recombined with the kept singular values."""
    first = _f32(tvs[0])
    k = tsv_rank(first.shape, len(tvs))
    if k == 0:
        raise ValueError(f"TSV-M keeps {min(first.shape)} // {len(tvs)} = 0 directions per task vector")
    r = min(first.shape)
    u_all = torch.zeros(first.shape[0], r, dtype=first.dtype, device=first.device)
    s_all = torch.zeros(r, dtype=first.dtype, device=first.device)
    v_all = torch.zeros(r, first.shape[1], dtype=first.dtype, device=first.device)
    for i, tv in enumerate(tvs):
        u, s, vh = torch.linalg.svd(_f32(tv), full_matrices=False)
        u_all[:, i * k : (i + 1) * k] = u[:, :k]
        s_all[i * k : (i + 1) * k] = s[:k]
        v_all[i * k : (i + 1) * k, :] = vh[:k, :]
    uu, _, uvh = torch.linalg.svd(u_all, full_matrices=False)
    vu, _, vvh = torch.linalg.svd(v_all, full_matrices=False)
    return torch.linalg.multi_dot((uu, uvh, torch.diag(s_all), vu, vvh))


def iso_c(tvs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025): the sum of the task vectors with its singular values flattened
    to their mean (an isotropic spectrum in the common subspace)."""
    total = sum(_f32(t) for t in tvs) / len(tvs) * len(tvs)  # as FusionBench forms it (mean, times T)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.full_like(s, s.mean().item())), vh))


def iso_cts(tvs: Sequence[torch.Tensor], common_fraction: float) -> torch.Tensor:
    """Iso-CTS: the top singular directions of the sum (a `common_fraction` of the rank, adjusted so the
    rest divides evenly among the tasks) plus, per task, the top directions of its task vector with the
    common subspace projected out; both bases orthogonalised, one flat spectrum at the mean."""
    count = len(tvs)
    first = _f32(tvs[0])
    r = min(first.shape)
    common = int(r * common_fraction)
    common = r - round((r - common) / count) * count
    per_task = int((r - common) / count)
    total = sum(_f32(t) for t in tvs)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], vh[:common, :]
    u_all = torch.zeros(first.shape[0], r, dtype=first.dtype, device=first.device)
    s_all = torch.zeros(r, dtype=first.dtype, device=first.device)
    v_all = torch.zeros(r, first.shape[1], dtype=first.dtype, device=first.device)
    for i, tv in enumerate(tvs):
        w = _f32(tv)
        specific = w - cu @ cu.T @ w
        tu, ts, tvh = torch.linalg.svd(specific, full_matrices=False)
        u_all[:, i * per_task : (i + 1) * per_task] = tu[:, :per_task]
        s_all[i * per_task : (i + 1) * per_task] = ts[:per_task]
        v_all[i * per_task : (i + 1) * per_task, :] = tvh[:per_task, :]
    at = count * per_task
    u_all[:, at : at + common] = cu
    s_all[at : at + common] = cs
    v_all[at : at + common, :] = cv
    uu, _, uvh = torch.linalg.svd(u_all, full_matrices=False)
    vu, _, vvh = torch.linalg.svd(v_all, full_matrices=False)
    flat = torch.full_like(s_all, s_all.mean().item())
    return torch.linalg.multi_dot((uu @ uvh, torch.diag(flat), vu @ vvh))


def wudi(tvs: Sequence[torch.Tensor], iterations: int, lr: float) -> torch.Tensor:
    """WUDI (Cheng et al., ICML 2025): start from the sum of the task vectors and minimise, with Adam,
    sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2 — the merged vector's interference on each task's own
    input directions (a task vector's rows span the inputs it was trained on). A zero task vector adds
    nothing to the loss (FusionBench divides by its zero norm and returns NaN)."""
    stacked = torch.stack([_f32(t) for t in tvs])
    with torch.enable_grad():
        merged = torch.nn.Parameter(stacked.sum(dim=0))
        optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
        norms = torch.square(torch.norm(stacked.reshape(stacked.shape[0], -1), p=2, dim=-1))
        # a model that left this tensor unchanged (a frozen embedding) has no inputs to protect: its term is
        # 0 / 0 in the paper's loss (NaN in FusionBench's code); it is 0 here
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        for _ in range(iterations):
            disturbance = merged.unsqueeze(0) - stacked
            product = torch.matmul(disturbance, stacked.transpose(1, 2))
            loss = torch.sum(torch.square(product) / norms.unsqueeze(-1).unsqueeze(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return merged.detach()
