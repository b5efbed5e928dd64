"""Score a resident model with lm-eval, many times.

The lm-eval model wrapper, the task dict and each split's request instances are built once (see
evaluate/requests.py); a candidate costs only its LM calls, filters and metrics (the merge engine swaps
weights in place between calls). A candidate that breaks (non-finite logits, out of memory, a
generation error) comes back as a failed result with the reason; it never raises to the caller.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evomerge.errors import UserError, first_line
from evomerge.evaluate.requests import RequestSet, memoize_encoding
from evomerge.evaluate.spec import EvaluationSpec, TaskSpec
from evomerge.evaluate.tasks import task_manager

log = logging.getLogger(__name__)
SPLITS = ("search", "heldout", "all")


@dataclass
class EvalResult:
    ok: bool
    fitness: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    examples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {metric, ids, values}

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "fitness": self.fitness, "metrics": self.metrics, "examples": self.examples,
            "seconds": self.seconds, "error": self.error,
        }  # fmt: skip


def split_indices(num_docs: int, task: str, heldout: float | int, seed: int) -> dict[str, list[int]]:
    """Disjoint search / held-out example indices, a pure function of (task, size, heldout, seed)."""
    digest = hashlib.blake2b(f"{seed}:{task}".encode(), digest_size=8).digest()
    order = np.random.default_rng(int.from_bytes(digest, "little")).permutation(num_docs)
    count = int(round(heldout * num_docs)) if isinstance(heldout, float) else int(heldout)
    if not 0 < count < num_docs:
        raise UserError(
            f"task {task}: held-out split of {heldout} leaves no search or no held-out examples ({num_docs} in all)"
        )
    return {"heldout": order[:count].tolist(), "search": order[count:].tolist(), "all": order.tolist()}


def fewshot_seed(split_seed: int, task: str) -> int:
    """The seed of a task's few-shot sampler (and of every other RNG an evaluation touches): a function of
    the experiment's split seed and the task, so fitness is a pure function of (model, config)."""
    digest = hashlib.blake2b(f"{split_seed}:fewshot:{task}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def producible_metrics(task) -> list[str]:
    """The result keys (`metric,filter`) a task can report, from its metric list and filters."""
    metrics = list(getattr(task, "_metric_fn_list", {}) or {})
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return [f"{m},{f}" for f in filters for m in metrics]


def build_tasks(spec: EvaluationSpec, manager=None) -> tuple[dict[str, Any], dict[str, dict[str, list[int]]]]:
    """The configured lm-eval task objects and each task's search / held-out split. Everything about the
    tasks that can be wrong is found here, as one UserError: a group, data that cannot load, few-shot
    without a split to draw shots from, gen_kwargs on a non-generation task, a metric the task cannot
    report, a split that leaves no search or held-out examples."""
    from lm_eval.tasks import get_task_dict

    names = [t.name for t in spec.tasks]  # distinct: EvaluationSpec refuses a task listed twice
    manager = manager or task_manager(names, spec.include_paths)
    for name in names:
        if name in manager.all_groups:
            raise UserError(f"task {name} is a group; list its subtasks instead")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            task_dict = get_task_dict(names, manager)
    except UserError:
        raise
    except Exception as exc:  # missing data files, a broken YAML, a dataset that is not cached...
        kind = TaskDataUnreachable if _is_offline(exc) else UserError
        raise kind(f"evaluation.tasks: cannot load {', '.join(names)} ({_exc_line(exc)})") from None
    specs = {t.name: t for t in spec.tasks}
    splits: dict[str, dict[str, list[int]]] = {}
    for name, task in task_dict.items():
        _configure(name, task, specs[name])
        wanted = specs[name].metric
        if wanted is not None:
            can = producible_metrics(task)
            if can and wanted not in can:
                raise UserError(
                    f"evaluation.tasks ({name}).metric: {wanted!r} is not a metric this task reports "
                    f"(it reports: {', '.join(can)})"
                )
        try:
            docs = len(task.eval_docs)
        except Exception as exc:
            raise UserError(f"task {name}: cannot read its evaluation examples ({_exc_line(exc)})") from None
        key = specs[name].split_as or name
        splits[name] = split_indices(docs, key, spec.split.heldout, spec.split.seed)
        if key != name and key in task_dict and len(task_dict[key].eval_docs) != docs:
            raise UserError(f"task {name}: split_as {key}, but the tasks hold different numbers of examples")
    return task_dict, splits


def _configure(name: str, task, spec: TaskSpec) -> None:
    if spec.num_fewshot:
        if not (task.has_training_docs() or task.config.fewshot_split):
            raise UserError(
                f"task {name}: num_fewshot needs a training or fewshot split, or shots would come from the evaluation examples"
            )
        task.set_config(key="num_fewshot", value=spec.num_fewshot)
    elif spec.num_fewshot == 0:
        task.set_config(key="num_fewshot", value=0)
    if spec.gen_kwargs:
        if task.config.output_type != "generate_until":
            raise UserError(f"task {name}: gen_kwargs only apply to generate_until tasks")
        check_gen_kwargs(spec.gen_kwargs, f"task {name}: gen_kwargs")
        task.set_config(key="generation_kwargs", value=dict(spec.gen_kwargs), update=True)


_LM_EVAL_GEN_KEYS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_GEN_INTS = {"max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "max_length",
             "min_length", "min_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size",
             "num_return_sequences"}  # fmt: skip
_GEN_BOOLS = {"do_sample", "use_cache", "renormalize_logits", "remove_invalid_values"}
_GEN_FLOATS = {"temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "length_penalty",
               "epsilon_cutoff", "eta_cutoff", "max_time"}  # fmt: skip


def check_gen_kwargs(kwargs: dict[str, Any], where: str) -> None:
    """Keys and types lm-eval's HF generation accepts (its own: until and the max-token aliases; the rest
    go to transformers' generate): a typo is one line before the experiment exists, not a failure of every
    candidate."""
    import difflib

    from transformers import GenerationConfig

    known = set(_LM_EVAL_GEN_KEYS) | {k for k in GenerationConfig().to_dict() if not k.startswith("_")}
    known.discard("transformers_version")
    for key, value in kwargs.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"{where}: unknown generation option {key!r}{hint}")
        if key == "until":
            ok = isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            )
            want = "a string or a list of strings"
        elif key in _GEN_INTS:
            ok, want = (
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                "a whole number >= 0",
            )
        elif key in _GEN_BOOLS:
            ok, want = isinstance(value, bool), "true or false"
        elif key in _GEN_FLOATS:
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            )
            want = "a finite number >= 0"
        else:
            continue
        if not ok:
            raise UserError(f"{where}: {key} must be {want}, got {value!r}")


def check_length_tasks(lengths: frozenset[str], task_dict: dict[str, Any]) -> None:
    """A `generation_length` objective reads a generation task's answers: refuse any other kind."""
    for name in sorted(lengths):
        kind = getattr(task_dict.get(name), "OUTPUT_TYPE", None)
        if name in task_dict and kind != "generate_until":
            raise UserError(f"objectives: generation_length needs a generation task; {name} is {kind}")


def reseed(task_dict: dict[str, Any], seed: int) -> None:
    """Put every RNG an evaluation may draw from in the state the config fixes: each task's few-shot
    sampler (lm-eval seeds it from the clock otherwise, and it advances with every call), and the
    global random / numpy / torch generators (sampling in generation, lm-eval's own shuffles)."""
    for name, task in task_dict.items():
        task.set_fewshot_seed(seed=fewshot_seed(seed, name))
    base = fewshot_seed(seed, "")
    random.seed(base)
    np.random.seed(base)
    torch.manual_seed(base)


def calibration_prompts(
    spec: EvaluationSpec, task: str, count: int, manager=None, tokenizer=None
) -> list[str]:
    """What `Evaluator.calibration_prompts` gives, without a model (export rebuilds a RegMean merge);
    `tokenizer` renders the chat template when the spec asks for one."""
    task_dict, splits = build_tasks(spec, manager)
    reseed(task_dict, spec.split.seed)
    limits = {t.name: t.limit for t in spec.tasks}
    samples = {name: limited(splits[name]["search"], limits[name]) for name in task_dict}
    chat = chat_function(tokenizer) if spec.chat_template else None
    return RequestSet(
        task_dict, samples, build=True, chat=chat, multiturn=spec.fewshot_as_multiturn,
        tokenizer_name=_tokenizer_name(tokenizer),
    ).prompts(task, samples[task][:count])  # fmt: skip


def check_chat_template(tokenizer, where: str) -> None:
    """evaluation.chat_template needs a tokenizer that has one: said once, before any candidate."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            f"evaluation.chat_template: the tokenizer of {where} has no chat template (set chat_template: "
            "false, or use models whose tokenizer_config.json has one)"
        )


def chat_function(tokenizer):
    """A prompt renderer with lm-eval's HFLM.apply_chat_template behaviour, for code that has no HFLM."""
    if tokenizer is None:
        raise UserError("evaluation.chat_template: no tokenizer to render the chat template with")
    check_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "the model"))

    def render(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(
            history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )  # fmt: skip

    return render


def _tokenizer_name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "")).replace("/", "__")


def limited(chosen: list[int], limit: int | None) -> list[int]:
    """A split's items as the evaluator scores them: the first `limit` of its (shuffled) order, sorted."""
    return sorted(chosen[:limit] if limit else chosen)


def search_items(spec: EvaluationSpec, manager=None) -> dict[str, list[int]]:
    """Each task's search items (document ids), as every worker scores them."""
    _, splits = build_tasks(spec, manager)
    return {t.name: limited(splits[t.name]["search"], t.limit) for t in spec.tasks}


def per_item_mean(task, metric: str | None) -> bool:
    """Whether the task's fitness metric is a mean of per-item values (what an estimate from some items,
    or from items scored in parts, needs)."""
    from lm_eval.api.metrics import mean

    name = (metric or next(iter(producible_metrics(task)), ",")).split(",")[0]
    return task.aggregation().get(name) is mean


class TaskDataUnreachable(UserError):
    """A task's dataset lives on the hub and the hub cannot be reached (offline, or no network)."""


def _is_offline(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, ConnectionError) or type(exc).__name__ in ("OfflineModeIsEnabled", "ConnectError"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _exc_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc, 200)}"


class Evaluator:
    """Built once per worker around the resident model; `evaluate()` per candidate."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        spec: EvaluationSpec,
        manager=None,
        lengths: frozenset[str] = frozenset(),
    ) -> None:
        """`manager`: a TaskManager from `task_manager()` for these tasks, when the caller already has one
        (building one can mean indexing lm-eval's registry, ~10 s). `lengths`: generation tasks whose answers'
        lengths in tokens are also reported (`generation_length,none`: an objective's)."""
        from lm_eval.models.huggingface import HFLM

        self.spec = spec
        self.model = model
        self.task_dict, self.splits = build_tasks(spec, manager)
        self.specs: dict[str, TaskSpec] = {t.name: t for t in spec.tasks}
        check_length_tasks(lengths, self.task_dict)
        self.lengths = frozenset(lengths)
        self._requests: dict[str, RequestSet] = {}
        if spec.chat_template:
            check_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "the model"))
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
        memoize_encoding(self.lm)
        for request_type in ("generate_until", "loglikelihood", "loglikelihood_rolling"):
            # lm-eval draws a bar per request type and candidate; the search draws its own
            setattr(
                self.lm, request_type, functools.partial(getattr(self.lm, request_type), disable_tqdm=True)
            )
        self._probe = torch.tensor(
            [[tokenizer.eos_token_id or 0] * 4], device=next(model.parameters()).device
        )

    def reseed(self) -> None:
        reseed(self.task_dict, self.spec.split.seed)

    def calibration_prompts(self, task: str, count: int) -> list[str]:
        """The prompts of the first `count` search items of `task` (a data-aware merge's calibration)."""
        return self.requests("search").prompts(task, self.indices(task, "search")[:count])

    def set_model(self, model: torch.nn.Module) -> None:
        """Score another model object from now on (a data-flow candidate is a new module over the same
        resident layers); the tasks and the wrapper stay as they are."""
        if next(model.parameters()).device != next(self.model.parameters()).device:
            raise UserError("set_model: the new model is on another device")
        self.model = model
        self.lm._model = model
        self.lm._config = model.config

    def indices(self, task: str, split: str) -> list[int]:
        return limited(self.splits[task][split], self.specs[task].limit)

    def requests(self, split: str) -> RequestSet:
        """The split's request instances, built once (with the few-shot sampler seeded) and reused."""
        if split not in self._requests:
            self.reseed()
            samples = {name: self.indices(name, split) for name in self.task_dict}
            chat = self.lm.apply_chat_template if self.spec.chat_template else None
            self._requests[split] = RequestSet(
                self.task_dict,
                samples,
                self.lm,
                chat=chat,
                multiturn=self.spec.fewshot_as_multiturn,
                tokenizer_name=self.lm.tokenizer_name,
            )
        return self._requests[split]

    def evaluate(self, split: str = "search", items: dict[str, list[int]] | None = None) -> EvalResult:
        """Metrics and fitness (sum of weight x metric) of the model as it is now, with each task's
        per-item values of the metric that makes its fitness. `items`: score only these search items
        (document ids by task; a task left out is not scored), each with the prompt it has in the whole
        search split."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        started = time.perf_counter()
        samples = {name: self.indices(name, split) for name in self.task_dict}
        if items is not None:
            if split != "search":
                raise UserError("item subsets apply to the search split only")
            samples = {name: sorted(int(i) for i in ix) for name, ix in items.items() if ix}
            unknown = [name for name in samples if name not in self.task_dict]
            if unknown or not samples:
                raise UserError(f"item subset names no configured task ({', '.join(unknown) or 'empty'})")
        examples = {name: len(ix) for name, ix in samples.items()}
        try:
            with torch.no_grad():
                logits = self.model(self._probe).logits
            if not torch.isfinite(logits).all():
                raise FloatingPointError("non-finite logits")
            requests = self.requests(split)
            if items is not None:
                requests = requests.subset(samples)
            self.reseed()
            scores = requests.score(self.lm, self.lengths)
            metrics = {name: scores[name].metrics for name in samples}
            fitness, per_item = 0.0, {}
            for name, task_metrics in metrics.items():
                key = self.metric_key(name, task_metrics)
                value = task_metrics[key]
                if not math.isfinite(value):
                    raise FloatingPointError(f"{name} {key} is {value}")
                fitness += self.specs[name].weight * value
                if key in scores[name].items:
                    per_item[name] = {"metric": key, "ids": samples[name], "values": scores[name].items[key]}
            if not math.isfinite(fitness):
                raise FloatingPointError(f"fitness is {fitness}")
        except UserError:
            raise
        except Exception as exc:  # a broken candidate is data, not a crash (CUDA OOM is a RuntimeError)
            reason = f"{type(exc).__name__}: {first_line(exc)}"
            if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return EvalResult(
                False, -math.inf, examples=examples, seconds=time.perf_counter() - started, error=reason
            )
        return EvalResult(True, fitness, metrics, examples, time.perf_counter() - started, items=per_item)

    def metric_key(self, task: str, metrics: dict[str, float]) -> str:
        wanted = self.specs[task].metric
        if wanted is None:
            return next(iter(metrics))
        if wanted not in metrics:
            raise UserError(f"task {task} has no metric {wanted!r} (it reports: {', '.join(metrics)})")
        return wanted
