"""A worker's memory, planned before anything loads: from the checkpoints' headers and config alone.

Per worker the device holds the target model (what is scored), the method's precomputed tables, the
merge's float32 scratch for the largest tensor, the evaluation's memory (KV cache for
batch_size x eval_tokens, plus float32 logits over every position when a task scores log-likelihoods),
and either the base and sources themselves (`runtime.placement: device`) or staging buffers that the
sources stream through from host memory (`host`: two sets of the largest tensor per input, so one copy
runs while the previous tensor is merged). `auto` keeps sources on the device when all of it fits the
device's free memory, else in host memory. Host sources are page-locked (pinned) on CUDA, so that their
copies run asynchronously on a side stream, when they take at most half of the machine's RAM (or with
`runtime.pin_memory: on`): page-locked memory cannot be swapped or reclaimed, and 54 GiB of a 64 GB machine
(three 7B sources and a base in bf16) would starve everything else; larger sources stay pageable, copied
through the driver's staging buffer (slower, the same bits). A plan that fits nowhere is refused with one
line and its remedies, before a byte is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from evomerge.errors import UserError

GiB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_HOST_OVERHEAD = GiB // 2  # the worker process itself: torch, transformers, lm-eval (measured ~0.5 GiB)


@dataclass
class Shapes:
    """What the plan needs of the models, read from headers and config.json."""

    tensor_numels: list[int]  # the merged tensors of one model
    row_lengths: list[int]  # their last dimension (per-row tables)
    model_numel: int  # every tensor of the target model
    inputs: int  # merged models besides the base
    has_base: bool
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass
class MemoryPlan:
    device: str
    placement: str  # device | host (auto resolved)
    on_device: dict[str, int] = field(default_factory=dict)
    on_host: dict[str, int] = field(default_factory=dict)
    device_free: int | None = None  # None: not known here (no such device on this machine)
    host_free: int | None = None
    pinned: bool = False  # host sources page-locked (host placement on CUDA)

    @property
    def device_bytes(self) -> int:
        return sum(self.on_device.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.on_host.values())

    def fits(self) -> bool:
        device_ok = self.device_free is None or self.device_bytes <= self.device_free
        host_ok = self.host_free is None or self.host_bytes <= self.host_free
        return device_ok and host_ok

    def lines(self) -> list[str]:
        def items(parts: dict[str, int]) -> str:
            return ", ".join(f"{name} {_gib(n)}" for name, n in parts.items() if n)

        free = (
            f" of {_gib(self.device_free)} free"
            if self.device_free is not None
            else " (free memory unknown here)"
        )
        where = "host RAM" if self.device == "cpu" else self.device
        lines = [f"memory per worker, sources on the {'device' if self.placement == 'device' else 'host'}:"]
        lines.append(f"  {where}: {_gib(self.device_bytes)}{free} ({items(self.on_device)})")
        if self.device != "cpu":
            host_free = f" of {_gib(self.host_free)} available" if self.host_free is not None else ""
            lines.append(f"  host RAM: {_gib(self.host_bytes)}{host_free} ({items(self.on_host)})")
        return lines


def plan_memory(
    shapes: Shapes,
    *,
    dtype: str,
    device: str,
    placement: str,
    batch_size: int,
    eval_tokens: int,
    loglikelihood: bool,
    table_bytes: int,
    device_free: int | None,
    host_free: int | None,
    fused: bool = False,
    pin: str = "auto",
    host_total: int | None = None,
) -> MemoryPlan:
    """The plan for a `placement` of base and sources (device | host | auto), refused with a UserError when nothing fits.
    `fused`: the merge runs compiled (torch.compile: CUDA, or large models on a CPU). `pin` (auto | on |
    off): whether host sources are page-locked; auto: when they take at most half of `host_total`."""
    width = _BYTES[dtype]
    largest = max(shapes.tensor_numels, default=0)
    copies = shapes.inputs + int(shapes.has_base)
    source_bytes = copies * sum(shapes.tensor_numels) * width
    common = {
        "target": shapes.model_numel * width,
        "tables": table_bytes,
        # a compiled (fused) pass keeps one float32 tensor at most; eager ops materialise each input's
        # float32 task vector and a few sums
        "merge scratch": (1 if fused else copies + 3) * largest * 4,
        "KV cache": batch_size * eval_tokens * 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * width,
        "logits": batch_size * eval_tokens * shapes.vocab * 4
        if loglikelihood
        else batch_size * shapes.vocab * 4,
    }
    on_cpu = device == "cpu"

    def plan(where: str) -> MemoryPlan:
        result = MemoryPlan(device, where, device_free=device_free, host_free=host_free)
        if on_cpu:  # one memory: sources are where everything else is
            result.on_device = {**common, "sources": source_bytes, "process": _HOST_OVERHEAD}
            result.device_free = host_free if device_free is None else device_free
            return result
        result.on_device = dict(common)
        result.on_host = {"process": _HOST_OVERHEAD}
        if where == "device":
            result.on_device["sources"] = source_bytes
        else:
            result.on_device["staging"] = 2 * copies * largest * width
            result.pinned = pin == "on" or (pin == "auto" and pins_by_default(source_bytes, host_total))
            result.on_host["sources (pinned)" if result.pinned else "sources (pageable)"] = source_bytes
        return result

    if on_cpu:
        chosen = plan("device")
    elif placement == "auto":
        chosen = plan("device")
        if not chosen.fits():
            chosen = plan("host")
    else:
        chosen = plan(placement)
    if not chosen.fits():
        raise UserError(_refusal(chosen, source_bytes, placement))
    return chosen


def pins_by_default(source_bytes: int, host_total: int | None) -> bool:
    """`pin_memory: auto`: page-lock host sources when they take at most half of the machine's RAM."""
    return host_total is None or 2 * source_bytes <= host_total


def _refusal(plan: MemoryPlan, source_bytes: int, placement: str) -> str:
    if plan.device_free is not None and plan.device_bytes > plan.device_free:
        where = "host RAM" if plan.device == "cpu" else plan.device
        need = f"a worker needs {_gib(plan.device_bytes)} on {where}, which has {_gib(plan.device_free)} free"
        biggest = max(plan.on_device, key=plan.on_device.get)
        need += f" (largest: {biggest} {_gib(plan.on_device[biggest])})"
    else:
        need = f"a worker needs {_gib(plan.host_bytes)} of host RAM, {_gib(plan.host_free or 0)} is available"
    remedies = []
    if plan.device != "cpu" and plan.placement == "device":
        remedies.append(f"runtime.placement: host (moves {_gib(source_bytes)} of sources to host RAM)")
    remedies += [
        "a smaller evaluation.batch_size or runtime.eval_tokens",
        "fewer sources",
        "a GPU with more memory or more GPUs",
    ]
    if plan.device == "cpu" or placement == "host":
        remedies = remedies[-3:]
    return f"memory plan: {need}; remedies: " + "; ".join(remedies)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def shapes_of(base, sources: list, family, config: dict[str, Any]) -> Shapes:
    """Shapes from opened checkpoints (headers only) and the first model's config.json."""
    from evomerge.models.architecture import merged_names

    first = base or sources[0]
    names = merged_names(list(first.tensors), family, first.ties_embeddings(family))
    numels = [math.prod(first.tensors[n].shape) for n in names]
    rows = [first.tensors[n].shape[-1] if first.tensors[n].shape else 1 for n in names]
    heads = int(config.get("num_attention_heads", 1))
    hidden = int(config.get("hidden_size", 0))
    return Shapes(
        tensor_numels=numels,
        row_lengths=rows,
        model_numel=sum(math.prod(t.shape) for t in first.tensors.values()),
        inputs=len(sources),
        has_base=base is not None,
        layers=int(config.get("num_hidden_layers", 0)),
        kv_heads=int(config.get("num_key_value_heads", heads)),
        head_dim=int(config.get("head_dim") or (hidden // heads if heads else 0)),
        vocab=int(config.get("vocab_size", 0)),
    )


def free_memory(device: str) -> tuple[int | None, int | None, int]:
    """(free device bytes, available host bytes, total host bytes) on this machine; device None when it
    has no such GPU."""
    import psutil

    memory = psutil.virtual_memory()
    host, total = int(memory.available), int(memory.total)
    if device == "cpu":
        return None, host, total
    import torch

    if not torch.cuda.is_available():
        return None, host, total
    index = torch.device(device).index
    free, _ = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
    return int(free), host, total


def plan_for_config(
    config, base, sources: list, family, *, dtype: str, loglikelihood: bool, device: str
) -> MemoryPlan:
    """The plan of one worker of an experiment (`config`: an ExperimentConfig; `dtype` resolved)."""
    first = base or sources[0]
    runtime = config.runtime
    if config.dfs is not None:  # every source is a resident model; a candidate is a path over them
        shapes = shapes_of(None, sources, family, first.config)
        shapes.tensor_numels, shapes.has_base = [], False
        shapes.model_numel *= len(sources)
        table, fused = 0, False
    else:
        shapes = shapes_of(base, sources, family, first.config)
        estimate = config.merge.method.spec.state_bytes
        table = (
            sum(
                estimate(n, r, shapes.inputs)
                for n, r in zip(shapes.tensor_numels, shapes.row_lengths, strict=True)
            )
            if estimate
            else 0
        )
        compiled = runtime.compile == "on" or (runtime.compile == "auto" and device.startswith("cuda"))
        fused = compiled and config.merge.method.spec.fast is not None
    device_free, host_free, host_total = free_memory(device)
    return plan_memory(
        shapes,
        dtype=dtype,
        device=device,
        placement="device" if config.dfs is not None else runtime.placement,
        batch_size=config.evaluation.batch_size,
        eval_tokens=runtime.eval_tokens,
        loglikelihood=loglikelihood,
        table_bytes=table,
        device_free=device_free,
        host_free=host_free,
        fused=fused,
        pin=runtime.pin_memory,
        host_total=host_total,
    )
