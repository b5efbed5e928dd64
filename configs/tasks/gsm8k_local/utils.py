"""GSM8K from local files: $GSM8K_DIR/train.jsonl and $GSM8K_DIR/test.jsonl (the format of
github.com/openai/grade-school-math: one {"question", "answer"} object per line)."""

import json
import os
from pathlib import Path

import datasets


def load_local_gsm8k(**_):
    root = os.environ.get("GSM8K_DIR")
    if not root:
        raise ValueError("set GSM8K_DIR to the directory holding GSM8K's train.jsonl and test.jsonl")
    splits = {}
    for split in ("train", "test"):
        lines = (Path(root) / f"{split}.jsonl").read_text().splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])
    return splits
