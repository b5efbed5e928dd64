"""Lazy, memory-mapped access to a checkpoint's tensors (safetensors; pickle only when the user opts in)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge.errors import UserError, first_line
from evomerge.models.reference import resolve_model_dir

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_ST_INDEX = "model.safetensors.index.json"
_ST_SINGLE = "model.safetensors"
_PT_INDEX = "pytorch_model.bin.index.json"
_PT_SINGLE = "pytorch_model.bin"


_STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", **{n: n for n in DTYPES}}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a config's dtype name; None (keep what is stored) for None and `auto`."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def auto_dtype(checkpoints: list[Checkpoint], device: str) -> str:
    """`runtime.dtype: auto`: the models' stored dtype (bfloat16 for most hub models), float32 when they
    differ (no model loses precision) or store none, and float32 for float16 weights on a CPU (CPUs have no
    fast float16 arithmetic). The merge kernels compute in float32 whatever this is."""
    stored = {c.stored_dtype for c in checkpoints}
    if len(stored) != 1 or None in stored:
        return "float32"
    (name,) = stored
    return "float32" if name == "float16" and not device.startswith("cuda") else name


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Checkpoint:
    """One model directory: its config and an index of tensor name -> file, shape, dtype.

    Tensors are read one at a time through safetensors' mmap, so opening a checkpoint costs only its headers.
    """

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    pickled: bool = False
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls, ref: str | os.PathLike[str], *, allow_pickle: bool = False, base_dir: Path | None = None
    ) -> Checkpoint:
        path = resolve_model_dir(ref, base_dir=base_dir)
        config = _read_config(path, str(ref))
        files, pickled = _weight_files(path, str(ref), allow_pickle)
        tensors: dict[str, TensorInfo] = {}
        ckpt = cls(ref=str(ref), path=path, config=config, tensors=tensors, pickled=pickled)
        for file in files:
            if pickled:
                for name, tensor in ckpt._load_pickle(file).items():
                    tensors[name] = TensorInfo(
                        file, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
                    )
                continue
            handle = ckpt._handle(file)
            for name in handle.keys():
                piece = handle.get_slice(name)
                tensors[name] = TensorInfo(file, tuple(piece.get_shape()), str(piece.get_dtype()))
        if not tensors:
            raise UserError(f"model {ref}: checkpoint holds no tensors")
        return ckpt

    @property
    def stored_dtype(self) -> str | None:
        """The floating dtype holding most of the weights (float32, bfloat16 or float16), from the headers."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            name = _STORED.get(info.dtype)
            if name is not None:
                counts[name] = counts.get(name, 0) + math.prod(info.shape)
        return max(counts, key=counts.get) if counts else None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    def ties_embeddings(self, family) -> bool:
        """Whether transformers (5) loads this model with lm_head sharing the embeddings' storage: the config
        asks for it and the checkpoint stores no separate head, or stores the same values (with different
        values it keeps them apart)."""
        if not self.config.get("tie_word_embeddings", False):
            return False
        for name, shared in family.tied:
            if (
                name in self.tensors
                and shared in self.tensors
                and not torch.equal(self.get(name), self.get(shared))
            ):
                return False
        return True

    def names(self) -> Iterator[str]:
        return iter(self.tensors)

    def get(
        self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        info = self.tensors[name]
        if self.pickled:
            tensor = self._load_pickle(info.file)[name]
        else:
            try:
                tensor = self._handle(info.file).get_tensor(name)
            except Exception as exc:  # truncated or corrupt data region
                raise UserError(
                    f"model {self.ref}: cannot read tensor {name} from {info.file.name} ({first_line(exc)})"
                ) from None
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device) if torch.device(device) != tensor.device else tensor

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:
                raise UserError(
                    f"model {self.ref}: {file.name} is not a valid safetensors file ({first_line(exc)})"
                ) from None
        return self._handles[file]

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickle_cache:
            try:
                self._pickle_cache[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise UserError(
                    f"model {self.ref}: cannot load {file.name} with weights_only=True ({first_line(exc)})"
                ) from None
        return self._pickle_cache[file]


def _read_config(path: Path, ref: str) -> dict[str, Any]:
    """config.json as a mapping with a usable layer count; one UserError naming the file otherwise."""
    file = path / "config.json"
    if not file.is_file():
        raise UserError(f"model {ref}: no config.json in {path}")
    config = _read_json(file, ref)
    if not isinstance(config, dict):
        raise UserError(f"model {ref}: {file} holds a JSON {type(config).__name__}, not an object")
    layers = config.get("num_hidden_layers", 0)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
        raise UserError(
            f"model {ref}: {file}: num_hidden_layers must be a whole number of layers, got {layers!r}"
        )
    return config


def _read_json(file: Path, ref: str) -> Any:
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"model {ref}: {file} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"model {ref}: {file.name} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"model {ref}: cannot read {file} ({exc.strerror})") from None


def _weight_files(path: Path, ref: str, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The files that hold the weights, decided here the way transformers decides (index, then
    model.safetensors, then pickles), so the weights evomerge reads are the ones transformers loads. Other
    .safetensors names are used only when nothing else is there: beside a .bin, transformers would load
    the .bin instead, so that is refused as ambiguous."""
    if (path / _ST_INDEX).is_file():
        return _sharded(path, _ST_INDEX, ref), False
    if (path / _ST_SINGLE).is_file():
        return [path / _ST_SINGLE], False
    singles = sorted(path.glob("*.safetensors"))
    pickles = [path / _PT_INDEX] if (path / _PT_INDEX).is_file() else sorted(path.glob("*.bin"))
    if singles and pickles:
        raise UserError(
            f"model {ref}: {path} holds {singles[0].name} (not named {_ST_SINGLE}, no {_ST_INDEX}) beside "
            f"{pickles[0].name}, which transformers would load instead; keep one: rename the safetensors file "
            f"to {_ST_SINGLE} or remove the other"
        )
    if singles:
        return singles, False
    if pickles:
        if not allow_pickle:
            raise UserError(
                f"model {ref}: only pickle (.bin) weights found; pickle can run arbitrary code, so evomerge refuses it "
                "unless you set allow_pickle: true (then loaded with weights_only=True), or convert the model to safetensors"
            )
        if (path / _PT_INDEX).is_file():
            return _sharded(path, _PT_INDEX, ref), True
        return pickles, True
    raise UserError(f"model {ref}: no safetensors weights in {path}")


def _sharded(path: Path, index_name: str, ref: str) -> list[Path]:
    index = _read_json(path / index_name, ref)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UserError(
            f"model {ref}: {path / index_name} is malformed (expected an object whose weight_map maps "
            "tensor names to file names)"
        )
    files = []
    for name in dict.fromkeys(weight_map.values()):
        file = path / name
        if Path(name).name != name or not file.is_file():
            raise UserError(f"model {ref}: shard {name!r} listed in {index_name} is missing")
        files.append(file)
    return files
