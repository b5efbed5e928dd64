"""Activation statistics for data-aware merges (RegMean): the Gram matrix of every nn.Linear's inputs,
averaged over the real tokens of calibration batches. Padding is left out (the attention mask selects
the rows), unlike FusionBench's RegMean hook, which averages over every position of the padded batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def linear_grams(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    names: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """{"<module>.weight": mean of x x^T over the unmasked tokens} for every nn.Linear of `model` (those
    whose weight is in `names`, when given), float32; accumulated in float64."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(key: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0]
            keep = current["mask"].reshape(-1).bool()
            rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] != keep.shape[0]:
                raise RuntimeError(f"{key}: its input is not one row per token; cannot apply the mask")
            rows = rows[keep].double()
            sums[key] = sums[key] + rows.T @ rows if key in sums else rows.T @ rows
            counts[key] = counts.get(key, 0) + rows.shape[0]

        return hook

    for module_name, module in model.named_modules():
        key = f"{module_name}.weight"
        if isinstance(module, torch.nn.Linear) and (names is None or key in names):
            hooks.append(module.register_forward_hook(hook_for(key)))
    try:
        for ids, mask in batches:
            current["mask"] = mask
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return {k: (sums[k] / counts[k]).float() for k in sums}


def batches_of(tokenizer, texts: list[str], device, size: int = 8, max_length: int = 2048):
    """Right-padded (ids, attention mask) batches of `texts`, in order."""
    out = []
    for start in range(0, len(texts), size):
        enc = tokenizer(
            texts[start : start + size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        out.append((enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    return out
