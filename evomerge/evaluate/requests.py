"""A task's requests built once per item set, scored per candidate, with each item's metric kept.

`lm_eval.evaluator.evaluate` rebuilds every request instance (prompt, few-shot context, target: Jinja
templates rendered per document) on every call, which on small models costs more than the forward passes.
The instances depend on the items and the few-shot seed only, never on the weights, so `RequestSet` builds
them once and a candidate pays only for the LM calls, the filters and the metrics. It runs the same steps
as lm-eval's `evaluate` in the same order (instances of one request type from every task in one LM call,
filters, `process_results` per document, the task's aggregation per metric), so the scores are the same
numbers (tested against `evaluate` on generation, log-likelihood and few-shot tasks).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TaskScore:
    """One task's scores: aggregated metrics (`metric,filter` -> value, lm-eval's order) and, for metrics
    whose per-item values are numbers, those values in item order."""

    metrics: dict[str, float]
    items: dict[str, list[float]] = field(default_factory=dict)


class RequestSet:
    """The request instances of `task_dict`'s tasks on the given items (document indices per task)."""

    def __init__(
        self,
        task_dict: dict[str, Any],
        samples: dict[str, list[int]],
        lm=None,
        *,
        build: bool = False,
        chat=None,
        multiturn: bool = False,
        tokenizer_name: str = "",
    ) -> None:
        """`lm` (or `build`): render the requests now; neither: an empty set for `subset` to fill. `chat`:
        the chat-template function prompts go through (lm-eval's `apply_chat_template`), None for plain
        prompts; `multiturn`: few-shot examples as earlier turns."""  # fmt: skip
        self.task_dict = task_dict
        self.samples = {name: list(ix) for name, ix in samples.items()}
        self.instances: dict[str, list] = {}
        self.docs: dict[str, list[tuple[int, Any]]] = {}
        self.by_doc: dict[str, dict[int, list]] = {}
        self.by_type: dict[str, list] = defaultdict(list)
        if lm is None and not build:
            return  # `subset` fills it
        for name, task in task_dict.items():
            _memoize_targets(task)
            task.build_all_requests(
                limit=None, samples=self.samples[name], rank=0, world_size=1, cache_requests=False,
                rewrite_requests_cache=False, system_instruction=None, apply_chat_template=chat is not None,
                fewshot_as_multiturn=multiturn and chat is not None, chat_template=chat,
                tokenizer_name=tokenizer_name if chat is not None else "",
            )  # fmt: skip
            instances = list(task.instances)
            self.instances[name] = instances
            for instance in instances:
                self.by_type[instance.request_type].append(instance)
            grouped: dict[int, list] = defaultdict(list)
            for instance in instances:
                grouped[instance.doc_id].append(instance)
            for group in grouped.values():
                group.sort(key=lambda x: x.idx)
            self.by_doc[name] = grouped
            self.docs[name] = list(
                task.doc_iterator(rank=0, limit=None, world_size=1, samples=self.samples[name])
            )

    def prompts(self, task: str, doc_ids: list[int]) -> list[str]:
        """Each item's prompt as the model reads it (its first request's context, few-shot included)."""
        position = {doc: i for i, doc in enumerate(self.samples[task])}
        return [self.by_doc[task][position[d]][0].args[0] for d in doc_ids]

    def subset(self, samples: dict[str, list[int]]) -> RequestSet:
        """The same request instances restricted to some of the items (cheap: nothing is rendered again),
        so an item's prompt and few-shot context are the ones it has in the whole set, whatever subset it
        is scored in."""
        view = RequestSet(self.task_dict, {name: sorted(ix) for name, ix in samples.items()})
        for name in view.samples:
            # lm-eval numbers a request set's documents 0, 1, ... in dataset order: positions, not ids
            position = {doc: i for i, doc in enumerate(self.samples[name])}
            missing = [doc for doc in view.samples[name] if doc not in position]
            if missing:
                raise ValueError(f"{name}: items {missing[:5]} are not in the request set")
            wanted = {position[doc] for doc in view.samples[name]}
            view.instances[name] = [i for i in self.instances[name] if i.doc_id in wanted]
            view.by_doc[name] = {d: reqs for d, reqs in self.by_doc[name].items() if d in wanted}
            view.docs[name] = [(d, doc) for d, doc in self.docs[name] if d in wanted]
        chosen = {id(i) for instances in view.instances.values() for i in instances}
        for request_type, requests in self.by_type.items():
            kept = [r for r in requests if id(r) in chosen]  # the same order as the whole set's
            if kept:
                view.by_type[request_type] = kept
        return view

    def score(self, lm, lengths: frozenset[str] = frozenset()) -> dict[str, TaskScore]:
        """Run the model (as it is now) on every request and score each task; for the tasks in `lengths`,
        also the number of tokens each generated answer took (`generation_length,none`, per item)."""
        for instances in self.instances.values():
            for instance in instances:
                instance.resps = []
                instance.filtered_resps = {}
        for request_type, requests in self.by_type.items():
            cloned = [req for req in requests for _ in range(req.repeats)]
            for response, req in zip(getattr(lm, request_type)(cloned), cloned, strict=True):
                req.resps.append(response)
        scores = {name: self._score_task(name, self.task_dict[name]) for name in self.instances}
        for name in lengths & scores.keys():
            values = [
                float(_generated_tokens(lm, self.by_doc[name][doc_id])) for doc_id, _ in self.docs[name]
            ]
            scores[name].metrics[LENGTH_KEY] = float(np.mean(values)) if values else math.nan
            scores[name].items[LENGTH_KEY] = values
        return scores

    def _score_task(self, name: str, task) -> TaskScore:
        from lm_eval.api.metrics import mean

        task._instances = self.instances[name]  # the filters read (and write) the task's own list
        task.apply_filters()
        raw: dict[tuple[str, str], list] = {}
        for filter_key in self.instances[name][0].filtered_resps:
            for doc_id, doc in self.docs[name]:
                requests = self.by_doc[name][doc_id]
                values = task.process_results(doc, [req.filtered_resps[filter_key] for req in requests])
                for metric, value in values.items():
                    raw.setdefault((metric, filter_key), []).append(value)
        aggregations = task.aggregation()
        metrics, items = {}, {}
        for (metric, filter_key), values in raw.items():
            key = f"{metric},{filter_key}"
            value = aggregations.get(metric, mean)(values)
            if isinstance(value, (int, float, np.floating, np.integer)):
                metrics[key] = float(value)
            if len(values) == len(self.docs[name]) and all(_is_number(v) for v in values):
                items[key] = [float(v) for v in values]
        return TaskScore(metrics, items)


LENGTH_KEY = "generation_length,none"


def _generated_tokens(lm, requests: list) -> int:
    """Tokens of a document's generated answer (its first generation request's raw response)."""
    for req in requests:
        if req.request_type == "generate_until":
            return len(lm.tok_encode(req.resps[0]))
    raise ValueError("not a generation task")


def _memoize_targets(task) -> None:
    """Scoring a document asks the task for its target again (`process_results` -> `doc_to_target`), which
    renders a Jinja template compiled anew on every call: more time than a small model's forward passes.
    A target is a function of the document alone, so it is computed once per document (keyed by the
    document object, which the request set keeps alive) and the same value returned after."""
    if getattr(task, "_evomerge_targets", None) is not None:
        return
    original = task.doc_to_target
    cache: dict[int, tuple[Any, Any]] = {}

    def doc_to_target(doc, *args, **kwargs):
        if args or kwargs:
            return original(doc, *args, **kwargs)
        hit = cache.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = (doc, original(doc))
            cache[id(doc)] = hit
        return hit[1]

    task._evomerge_targets = cache
    task.doc_to_target = doc_to_target


def memoize_encoding(lm) -> None:
    """The same prompts are tokenized for every candidate: keep each string's token ids (the wrapper's
    `tok_encode` is a function of the string and its options only)."""
    original = lm.tok_encode
    cache: dict[tuple, list[int]] = {}

    def tok_encode(string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        if kwargs:
            return original(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens, left_truncate_len)
        if key not in cache:
            if len(cache) > 1_000_000:
                cache.clear()
            cache[key] = original(string, add_special_tokens, left_truncate_len)
        return list(cache[key])

    lm.tok_encode = tok_encode


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float, np.floating, np.integer, np.bool_)) and not (
        isinstance(value, float) and math.isnan(value)
    )
