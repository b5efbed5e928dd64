"""In-memory merging for the search: sources resident once, each candidate written in place.

Per candidate the engine does only kernel work: no model is built, nothing is read from disk. What does
not depend on the candidate is computed once at load, by the method's `precompute` (TIES magnitude
thresholds, SLERP angles); the method's `fast` path writes each tensor in place (its exact kernel when it
has none). The elementwise kernels are compiled with torch.compile into one fused pass per tensor
(about 40x faster than eager torch on a CPU); if compilation is unavailable the same functions run eagerly.

`exact=True` uses the exact kernels (true top-k per candidate) instead; `evomerge merge` always does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import UserError, first_line
from evomerge.merge.methods import Method, TensorParams
from evomerge.merge.recipe import Recipe
from evomerge.models.architecture import merged_names
from evomerge.models.checkpoint import Checkpoint
from evomerge.models.compat import check_compatible

log = logging.getLogger(__name__)
_AUTO_COMPILE_BYTES = 64 * 1024**2


class _Kernels:
    """Wraps the elementwise kernels: compiled on first use when asked, eager after any compile error."""

    def __init__(self, compile: bool) -> None:
        self.compile = compile
        self._compiled: dict[str, Callable] = {}

    @property
    def eager(self) -> bool:
        return not self.compile

    def __call__(self, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            if self.compile:
                try:
                    if fn.__name__ not in self._compiled:
                        _allow_recompiles()
                        self._compiled[fn.__name__] = torch.compile(fn, dynamic=True)
                    return self._compiled[fn.__name__](*args, **kwargs)
                except Exception as exc:  # no C++ compiler, unsupported backend...: same math, eagerly
                    log.warning(
                        "torch.compile failed (%s); merging with eager kernels",
                        first_line(exc, 200),
                    )
                    self.compile = False
            return fn(*args, **kwargs)

        return run


def _allow_recompiles(limit: int = 64) -> None:
    """One kernel (gta_into) is compiled once per keep mode and argument layout: a search's method plus the
    finals' default merges, several engines in one process. Past dynamo's default limit of 8 it would
    silently run eagerly, tens of times slower."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


class MergeEngine:
    def __init__(
        self,
        base: Checkpoint | None,
        inputs: Sequence[Checkpoint],
        method: Method,
        target: torch.nn.Module,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        exact: bool = False,
        compile: bool | str = "auto",
        placement: str = "device",
        pin: bool = True,
        pool: bool = False,
    ) -> None:
        """`pool`: the inputs are a pool each `apply` picks from per tensor (a merge config whose slices
        give the method other models in each layer range: mergekit-evolve's slerp); exact kernels only."""
        spec = method.spec
        if placement not in ("device", "host"):
            raise ValueError(f"placement must be device or host, not {placement!r}")
        if pool and base is not None:
            raise ValueError("a pool engine takes no base: each apply picks one from the pool")
        if not pool:
            spec.check_models(base is not None, len(inputs))
        self.method = method
        self.pool = pool
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.exact = exact or pool
        checkpoints = ([base] if base is not None else []) + list(inputs)
        self.family = check_compatible(checkpoints)
        first = checkpoints[0]
        self.names = merged_names(list(first.tensors), self.family, _shares_embeddings(target, self.family))
        self.num_layers = first.num_layers
        started = time.perf_counter()

        self.placement = placement
        home = self.device if placement == "device" else torch.device("cpu")
        pin = pin and placement == "host" and self.device.type == "cuda"  # page-locked: asynchronous copies

        def load(ckpt: Checkpoint, name: str) -> torch.Tensor:
            raw = ckpt.get(name)  # mmap-backed: copy once into owned memory, so that page-cache eviction
            # can never turn a candidate into a disk read (one copy whatever the device and dtype)
            owned = raw.to(device=home, dtype=dtype or raw.dtype, copy=True)
            return owned.pin_memory() if pin else owned

        self.base = {name: load(base, name) for name in self.names} if base is not None else None
        self.inputs = [{name: load(ckpt, name) for name in self.names} for ckpt in inputs]
        self.targets = self._bind_target(target)
        self._stager = _Stager(self) if placement == "host" else None
        self.resident_bytes = sum(
            t.numel() * t.element_size()
            for src in ([self.base] if self.base else []) + self.inputs
            for t in src.values()
        )
        if compile == "auto":
            compile = self.device.type == "cuda" or self.resident_bytes >= _AUTO_COMPILE_BYTES
        self.kernels = _Kernels(bool(compile))
        self.state: dict[str, Any] = {}
        self.calibrated = False
        if not self.exact:
            self._precompute()
        self.load_seconds = time.perf_counter() - started

    def _bind_target(self, target: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = target.state_dict(keep_vars=True)
        bound = {}
        for name in self.names:
            if name not in state:
                raise UserError(f"target model has no tensor {name}")
            param = state[name]
            if tuple(param.shape) != tuple(self.inputs[0][name].shape):
                raise UserError(
                    f"target tensor {name} has shape {list(param.shape)}, sources have {list(self.inputs[0][name].shape)}"
                )
            if param.device != self.device:
                raise UserError(f"target model is on {param.device}, engine device is {self.device}")
            param.requires_grad_(False)
            bound[name] = param.detach()
        return bound

    def _precompute(self) -> None:
        """Candidate-independent work, done once per tensor (the method's `precompute`)."""
        prepare = self.method.spec.precompute
        if prepare is None:
            return
        for name in self.names:
            models = [src[name] for src in self.inputs]
            self.state[name] = prepare(
                name, self.base[name] if self.base else None, models, self.kernels.eager
            )

    def calibrate(self, grams: Mapping[str, list[torch.Tensor]]) -> None:
        """The activation statistics of a calibrated method (RegMean): per Linear weight, one Gram matrix per
        input model, kept where the sources are kept."""
        home = self.device if self.placement == "device" else torch.device("cpu")
        for name, per_model in grams.items():
            if name in self.names:
                self.state[name] = [g.to(home) for g in per_model]
        self.calibrated = True

    @torch.no_grad()
    def apply(
        self,
        recipe: Recipe | Mapping[str, TensorParams],
        pick: Mapping[str, tuple[int | None, tuple[int, ...]]] | None = None,
    ) -> None:
        """Write the merge for `recipe` into the target model's tensors. `pick` (pool engines only): per
        tensor, the pool index of its base (None: none) and those of its inputs, in the method's order."""
        if self.method.spec.calibrated and not self.calibrated:
            raise UserError(
                f"{self.method.value} merges from activation statistics: calibrate the engine first"
            )
        if (pick is not None) != self.pool:
            raise ValueError("pick goes with a pool engine, and a pool engine needs it")
        params = recipe.tensor_params(self.names, self.family) if isinstance(recipe, Recipe) else recipe
        if self._stager is not None:
            for name, base, models, state in self._stager.stream(self.names):
                if pick is not None:
                    base, models = _picked(pick[name], models)
                self._merge(name, base, models, params[name], state)
                self._stager.done()
            return
        for name in self.names:
            base = self.base[name] if self.base is not None else None
            models = [src[name] for src in self.inputs]
            if pick is not None:
                base, models = _picked(pick[name], models)
            self._merge(name, base, models, params[name], self.state.get(name))

    @torch.no_grad()
    def non_finite(self) -> str | None:
        """The first merged tensor holding a NaN or an infinity (None when all are finite): such a model
        scores as garbage or crashes generation, so the candidate fails instead. One read-only pass (a
        float32 sum per tensor: NaN and infinities survive it) and one device sync; a flagged tensor is
        then checked entry by entry (a finite tensor whose sum overflows is not refused)."""
        sums = torch.stack([self.targets[n].sum(dtype=torch.float32) for n in self.names])
        if bool(torch.isfinite(sums).all()):
            return None
        for i in (~torch.isfinite(sums)).nonzero()[:, 0].tolist():
            if not bool(torch.isfinite(self.targets[self.names[i]]).all()):
                return self.names[i]
        return None

    @torch.no_grad()
    def load_input(self, index: int) -> None:
        """Write input model `index` itself into the target (a parent, scored as a baseline)."""
        for name in self.names:
            self.targets[name].copy_(self.inputs[index][name])

    def _merge(self, name: str, base, models, p: TensorParams, state) -> None:
        out = self.targets[name]
        spec = self.method.spec
        if self.exact or spec.fast is None:
            out.copy_(spec.exact(name, base, models, p))
            return
        spec.fast(self.kernels, out, base, models, p, name, state)


class _Stager:
    """`placement: host`: each tensor's inputs (base, models, and what was precomputed for it) are copied
    into one of two reusable device buffers while the previous tensor is merged from the other. On CUDA the
    copies run on a side stream (asynchronously when the sources are pinned), ordered by events (a buffer
    is refilled only after the merge that read it has run); on a CPU the same path copies synchronously.
    The kernels see the same values either way, so the merge is bit-identical to `device` placement."""

    def __init__(self, engine: MergeEngine) -> None:
        self.engine = engine
        self.sources = sources = ([engine.base] if engine.base is not None else []) + engine.inputs
        largest = max(t.numel() for src in sources for t in src.values())
        dtypes = [next(iter(src.values())).dtype for src in sources]
        self.buffers = [
            [torch.empty(largest, dtype=dt, device=engine.device) for dt in dtypes] for _ in range(2)
        ]  # two sets: one being filled, one being read
        self.cuda = engine.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(engine.device)
            self.copied = [torch.cuda.Event() for _ in range(2)]
            self.freed = [torch.cuda.Event() for _ in range(2)]
        self.bytes_per_candidate = sum(t.numel() * t.element_size() for src in sources for t in src.values())
        self._slot = 0

    def _fill(self, name: str, slot: int):
        staged = []
        for buffer, src in zip(self.buffers[slot], self.sources, strict=True):
            host = src[name]
            view = buffer[: host.numel()].view(host.shape)
            view.copy_(host, non_blocking=self.cuda)
            staged.append(view)
        return (staged[0], staged[1:]) if self.engine.base is not None else (None, staged)

    def _state(self, name: str):
        """What was precomputed for `name`, on the device (copied on the compute stream, so the caching
        allocator never hands its memory to the copy stream while a kernel reads it)."""
        return _to_device(self.engine.state.get(name), self.engine.device)

    def stream(self, names: list[str]):
        """(name, base, models, state) on the device for each tensor in turn; call `done()` after each."""
        if not self.cuda:
            for name in names:
                yield name, *self._fill(name, 0), self._state(name)
            return
        compute = torch.cuda.current_stream(self.engine.device)
        filled = [None, None]

        def issue(i: int) -> None:
            slot = i % 2
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.freed[slot])  # the merge that read this set has run
                filled[slot] = self._fill(names[i], slot)
                self.copied[slot].record(self.copy_stream)

        for slot in range(2):
            self.freed[slot].record(compute)
        issue(0)
        for i, name in enumerate(names):
            if i + 1 < len(names):
                issue(i + 1)
            self._slot = i % 2
            compute.wait_event(self.copied[self._slot])
            yield name, *filled[self._slot], self._state(name)

    def done(self) -> None:
        if self.cuda:
            self.freed[self._slot].record(torch.cuda.current_stream(self.engine.device))


def _picked(choice: tuple[int | None, tuple[int, ...]], pool: list[torch.Tensor]):
    base, inputs = choice
    return (pool[base] if base is not None else None), [pool[i] for i in inputs]


def _to_device(state, device: torch.device):
    """A tensor's precomputed state with every tensor in it on `device` (lists and tuples walked)."""
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, list | tuple):
        return type(state)(_to_device(s, device) for s in state)
    return state


def _shares_embeddings(target: torch.nn.Module, family) -> bool:
    """Whether the loaded target's head is its embedding matrix (tied): then only the embeddings are written."""
    state = target.state_dict(keep_vars=True)
    return any(
        name in state and shared in state and state[name].data_ptr() == state[shared].data_ptr()
        for name, shared in family.tied
    )
