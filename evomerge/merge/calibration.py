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
    """Right-padded (ids, attention mask) batches of `texts`, in order: right, so that a real token's
    position (and with it its activations) does not depend on the batch's longest text."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = []
    for start in range(0, len(texts), size):
        rows = [
            tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
            for t in texts[start : start + size]
        ]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        out.append((ids.to(device), mask.to(device)))
    return out


def grams_per_model(
    models: Iterable[torch.nn.Module], batches, names: set[str]
) -> dict[str, list[torch.Tensor]]:
    """{weight name: [its Gram under each model]}; `models` yields each input model in turn (loaded, or
    written into one resident model), so only one is needed at a time."""
    per_model = []
    for model in models:
        per_model.append(linear_grams(model, batches, names))
        del model  # freed before the next one is loaded
    return {k: [m[k] for m in per_model] for k in per_model[0]}


def model_grams(checkpoints, tokenizer, texts: list[str], names: set[str], device="cpu", dtype=None):
    """`grams_per_model` with each checkpoint loaded as a model in turn (`evomerge merge` and export, where no
    engine holds the sources)."""
    from evomerge.models.loading import load_target

    models = (load_target(ckpt, device=device, dtype=dtype) for ckpt in checkpoints)
    return grams_per_model(models, batches_of(tokenizer, texts, device), names)


def read_texts(path) -> list[str]:
    """A calibration file: one JSON object with a "text" string per line."""
    import json

    from evomerge.errors import UserError

    texts = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as exc:
        raise UserError(f"calibration.texts: cannot read {path} ({exc.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f'calibration.texts: {path} line {n} is not a JSON object with a "text" string')
        texts.append(row["text"])
    if not texts:
        raise UserError(f"calibration.texts: {path} holds no text")
    return texts


def texts_file(texts: list[str]) -> bytes:
    import json

    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
