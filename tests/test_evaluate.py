"""The lm-eval evaluator on the shipped zoo models (real lm-eval, real transformers models)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE, cli, fewshot_task

from evomerge.evaluate import EvaluationSpec, Evaluator, split_indices
from evomerge.evaluate.run import load_model_and_tokenizer

ZOO = Path(__file__).resolve().parent.parent / "zoo"
TASKS = Path(__file__).resolve().parent.parent / "evomerge" / "tasks" / "zoo"


def _spec(*tasks, limit=40, heldout=300):
    return EvaluationSpec.model_validate(
        {
            "tasks": [{"name": t, "limit": limit} for t in tasks],
            "split": {"heldout": heldout},
            "batch_size": 32,
        }
    )


@pytest.fixture(scope="module")
def math_en():
    return load_model_and_tokenizer(str(ZOO / "math-en"), device=DEVICE, dtype="float32")


def _rows(task):
    return [json.loads(line) for line in (TASKS / f"{task}.jsonl").read_text().splitlines()]


def test_generation_scores_match_independent_greedy_decode(math_en):
    model, tok = math_en
    # the target task: math-en solves some of its language-2 problems, not all (its own task it solves ~all)
    evaluator = Evaluator(model, tok, _spec("zoo_math_x", limit=60))
    result = evaluator.evaluate("search")
    assert result.ok, result.error
    rows = _rows("zoo_math_x")
    indices = evaluator.indices("zoo_math_x", "search")
    assert result.examples["zoo_math_x"] == len(indices) == 60
    correct = 0
    for i in indices:
        ids = tok(rows[i]["question"], return_tensors="pt").input_ids.to(model.device)
        out = model.generate(
            ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0
        )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        match = re.search(r"#### (\-?[0-9\.\,]+)", text)
        gold = rows[i]["answer"].split("#### ")[-1]
        correct += bool(match) and match.group(1).rstrip(".") == gold
    assert result.metrics["zoo_math_x"]["exact_match,strict-match"] == pytest.approx(correct / len(indices))
    assert 0 < correct < len(indices)  # a trained model with something left to gain: not a vacuous check


def test_multiple_choice_scores_match_independent_loglikelihood(math_en):
    model, tok = math_en
    evaluator = Evaluator(model, tok, _spec("zoo_verbs_x", limit=30))
    result = evaluator.evaluate("heldout")
    rows = _rows("zoo_verbs_x")
    correct = 0
    for i in evaluator.indices("zoo_verbs_x", "heldout"):
        context = tok(rows[i]["context"]).input_ids
        scores = []
        for choice in rows[i]["choices"]:
            cont = tok(" " + choice).input_ids
            ids = torch.tensor([context + cont], device=model.device)
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0, len(context) - 1 : -1]
            scores.append(logp.gather(1, torch.tensor(cont, device=model.device)[:, None]).sum().item())
        correct += max(range(3), key=scores.__getitem__) == rows[i]["gold"]
    assert result.metrics["zoo_verbs_x"]["acc,none"] == pytest.approx(correct / 30)


def test_gold_logprob_task_shares_the_split_and_matches_a_forward_pass(math_en):
    model, tok = math_en
    spec = EvaluationSpec.model_validate(
        {
            "tasks": [
                {"name": "zoo_math_x", "limit": 12},
                {"name": "zoo_math_x_ll", "limit": 12, "split_as": "zoo_math_x", "weight": 0.01},
            ],
            "split": {"heldout": 300},
        }
    )
    evaluator = Evaluator(model, tok, spec)
    for split in ("search", "heldout"):
        assert evaluator.indices("zoo_math_x_ll", split) == evaluator.indices("zoo_math_x", split)
    result = evaluator.evaluate("search")
    rows = _rows("zoo_math_x")
    total = 0.0
    for i in evaluator.indices("zoo_math_x_ll", "search"):
        context, cont = tok(rows[i]["question"]).input_ids, tok(" " + rows[i]["answer"]).input_ids
        with torch.no_grad():
            ids = torch.tensor([context + cont], device=model.device)
            logp = model(ids).logits.log_softmax(-1)[0, len(context) - 1 : -1]
        total += logp.gather(1, torch.tensor(cont, device=model.device)[:, None]).sum().item()
    logprob = result.metrics["zoo_math_x_ll"]["logprob,none"]
    assert logprob == pytest.approx(total / 12, rel=1e-4)
    em = result.metrics["zoo_math_x"]["exact_match,strict-match"]
    assert result.fitness == pytest.approx(em + 0.01 * logprob)


def test_swapping_weights_in_place_equals_fresh_wrapper(math_en):
    model, tok = math_en
    spec = _spec("zoo_math_x", "zoo_verbs_x", limit=25)
    evaluator = Evaluator(model, tok, spec)
    before = evaluator.evaluate("search")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    other, _ = load_model_and_tokenizer(str(ZOO / "lang-x"), device=DEVICE, dtype="float32")
    try:
        model.load_state_dict(other.state_dict())  # in place, as the merge engine does
        swapped = evaluator.evaluate("search")
        fresh = Evaluator(other, tok, spec).evaluate("search")
        assert swapped.metrics == fresh.metrics
        assert swapped.metrics != before.metrics
    finally:
        model.load_state_dict(original)
    assert evaluator.evaluate("search").metrics == before.metrics


def test_splits_disjoint_and_stable_across_processes():
    split = split_indices(600, "zoo_math_x", 300, 0)
    assert not set(split["search"]) & set(split["heldout"])
    assert sorted(split["search"] + split["heldout"]) == list(range(600))
    assert len(split["heldout"]) == 300 and len(split_indices(600, "zoo_math_x", 0.25, 0)["heldout"]) == 150
    code = "from evomerge.evaluate import split_indices; import json; print(json.dumps(split_indices(600, 'zoo_math_x', 300, 0)))"
    other = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert other == split
    assert split_indices(600, "zoo_math_x", 300, 1) != split


def test_broken_candidate_is_a_failed_result_not_an_exception(math_en):
    model, tok = math_en
    evaluator = Evaluator(model, tok, _spec("zoo_math_en", limit=5))
    weight = model.model.layers[0].mlp.up_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        result = evaluator.evaluate()
        assert not result.ok and "non-finite logits" in result.error and result.fitness == float("-inf")
    finally:
        with torch.no_grad():
            weight.copy_(saved)

    def explode(*_):
        raise RuntimeError("CUDA out of memory (simulated)")

    handle = model.model.layers[1].register_forward_hook(explode)
    try:
        result = evaluator.evaluate()
        assert not result.ok and "out of memory" in result.error
    finally:
        handle.remove()
    assert evaluator.evaluate().ok


def test_eval_cli_json():
    done = cli(
        "eval", ZOO / "math-en", "--task", "zoo_math_en", "--limit", "20", "--json", "--device", DEVICE
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["examples"] == {"zoo_math_en": 20}
    assert 0 <= result["metrics"]["zoo_math_en"]["exact_match,strict-match"] <= 1


def test_unknown_task_fails_before_model_loads_with_suggestion():
    done = cli("eval", "/nonexistent/model", "--task", "zoo_math_z")
    assert done.returncode == 2
    assert "unknown task 'zoo_math_z'" in done.stderr and "zoo_math_x" in done.stderr
    assert "model directory" not in done.stderr


def test_gsm8k_local_task_runs_offline_from_plain_files(math_en, tmp_path, monkeypatch):
    """The shipped gsm8k_local task (lm-eval's gsm8k prompt, shots and filters) on a local copy."""
    model, tok = math_en
    rows = [
        {"question": f"w{i} has {i} apples ?", "answer": f"so {i} + 1 = {i + 1}\n#### {i + 1}"}
        for i in range(12)
    ]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setenv("GSM8K_DIR", str(tmp_path))
    spec = EvaluationSpec.model_validate(
        {
            "tasks": [{"name": "gsm8k_local", "limit": 3, "gen_kwargs": {"max_gen_toks": 8}}],
            "include_paths": [
                str(Path(__file__).resolve().parent.parent / "configs" / "tasks" / "gsm8k_local")
            ],
            "split": {"heldout": 6},
        }
    )
    result = Evaluator(model, tok, spec).evaluate("heldout")
    assert result.ok, result.error
    assert set(result.metrics["gsm8k_local"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert result.examples == {"gsm8k_local": 3}


def _lm_eval_scores(evaluator, split):
    """lm-eval's own `evaluate` on the same items, with the few-shot sampler seeded as the evaluator seeds it."""
    from lm_eval.evaluator import evaluate

    samples = {name: evaluator.indices(name, split) for name in evaluator.task_dict}
    evaluator.reseed()
    out = evaluate(
        lm=evaluator.lm, task_dict=evaluator.task_dict, samples=samples, bootstrap_iters=0,
        log_samples=False, verbosity="ERROR",
    )  # fmt: skip
    return {
        name: {k: float(v) for k, v in out["results"][name].items() if "," in k and "stderr" not in k}
        for name in evaluator.task_dict
    }


def test_requests_built_once_score_exactly_as_lm_eval(math_en, tmp_path):
    """Generation (two filters), multiple choice, log-likelihood with a custom metric, and a 3-shot task:
    the cached requests give lm-eval's numbers exactly, call after call, weights swapped in between."""
    fewshot_task(tmp_path, "fewshot_ll", test_rows=(200, 300), acc=True)
    model, tok = math_en
    spec = EvaluationSpec.model_validate(
        {
            "tasks": [{"name": t, "limit": 30} for t in ("zoo_math_x", "zoo_verbs_x", "zoo_math_x_ll", "fewshot_ll")],
            "include_paths": [str(tmp_path)], "split": {"heldout": 0.5, "seed": 7}, "batch_size": 16,
        }
    )  # fmt: skip
    evaluator = Evaluator(model, tok, spec)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lang_x, _ = load_model_and_tokenizer(str(ZOO / "lang-x"), device=DEVICE, dtype="float32")
    for state in (original, lang_x.state_dict(), original):
        model.load_state_dict(state)
        for split in ("search", "heldout"):
            ours = evaluator.evaluate(split)
            assert ours.ok, ours.error
            assert ours.metrics == _lm_eval_scores(evaluator, split)
            for name, items in ours.items.items():  # per-item values make the aggregate
                assert items["ids"] == evaluator.indices(name, split)
                if items["metric"].startswith(("acc", "exact_match", "logprob")):
                    assert sum(items["values"]) / len(items["values"]) == pytest.approx(
                        ours.metrics[name][items["metric"]]
                    )
    assert set(ours.items) == {"zoo_math_x", "zoo_verbs_x", "zoo_math_x_ll", "fewshot_ll"}
    assert len(evaluator._requests) == 2  # built once per split, reused by every later call


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("multiturn", [False, True])
def test_chat_template_prompts_score_exactly_as_lm_eval(math_en, tmp_path, multiturn):
    """evaluation.chat_template (mergekit-evolve's apply_chat_template, on by default there) and
    fewshot_as_multiturn: the prompts go through the tokenizer's chat template, and the scores are
    lm-eval's own with apply_chat_template / fewshot_as_multiturn on the same items."""
    from lm_eval.evaluator import evaluate
    from transformers import AutoTokenizer

    from evomerge.errors import UserError

    fewshot_task(tmp_path, "fewshot_ll", test_rows=(200, 300), acc=True)
    model, _ = math_en
    tok = AutoTokenizer.from_pretrained(ZOO / "math-en")
    spec = EvaluationSpec.model_validate(
        {
            "tasks": [{"name": t, "limit": 12} for t in ("zoo_math_x", "fewshot_ll")],
            "include_paths": [str(tmp_path)], "split": {"heldout": 0.5, "seed": 3}, "batch_size": 16,
            "chat_template": True, "fewshot_as_multiturn": multiturn,
        }
    )  # fmt: skip
    with pytest.raises(UserError, match="has no chat template"):
        Evaluator(model, tok, spec)
    tok.chat_template = CHAT
    evaluator = Evaluator(model, tok, spec)
    ours = evaluator.evaluate("search")
    assert ours.ok, ours.error
    prompt = evaluator.requests("search").prompts(
        "fewshot_ll", evaluator.indices("fewshot_ll", "search")[:1]
    )[0]
    assert prompt.startswith("<|user|>") and prompt.count("<|user|>") == (4 if multiturn else 1)
    samples = {name: evaluator.indices(name, "search") for name in evaluator.task_dict}
    evaluator.reseed()
    out = evaluate(
        lm=evaluator.lm, task_dict=evaluator.task_dict, samples=samples, bootstrap_iters=0, log_samples=False,
        verbosity="ERROR", apply_chat_template=True, fewshot_as_multiturn=multiturn,
    )  # fmt: skip
    theirs = {
        name: {k: float(v) for k, v in out["results"][name].items() if "," in k and "stderr" not in k}
        for name in evaluator.task_dict
    }
    assert ours.metrics == theirs
