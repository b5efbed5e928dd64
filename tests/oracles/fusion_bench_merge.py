"""Run by FusionBench's own venv (never imported by evomerge): merge task vectors with FusionBench
0.2.33's functions and write the merged tensors, as its algorithms' `run` forms them.

    python fusion_bench_merge.py IN.safetensors JOBS.json

IN holds `base.<name>` and `tv<i>.<name>` tensors; JOBS is a list of {"method", "params", "exclude_keys",
"out"}: each job's merged model is written to its `out` (safetensors). One thread (the SVDs depend on it).
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    source, jobs_path = sys.argv[1:3]
    torch.set_num_threads(1)
    tensors = load_file(source)
    base = {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}
    count = 1 + max(int(k.split(".", 1)[0][2:]) for k in tensors if k.startswith("tv"))
    tvs = [{n: tensors[f"tv{i}.{n}"] for n in base} for i in range(count)]
    for job in json.loads(open(jobs_path).read()):
        merge(base, tvs, job["method"], job["params"], job.get("exclude_keys") or [], job["out"])


def merge(base, tvs, method, params, exclude, out) -> None:
    if method == "tsv_m":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction,
        )

        merged = compute_and_sum_svd_mem_reduction(tvs, exclude_keys=exclude, accelerator="cpu")
        merged = {n: v * params.get("alpha", 1.0) for n, v in merged.items()}
    elif method == "iso_c":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c

        merged = iso_c(tvs, accelerator="cpu", exclude_keys=exclude)
        merged = {n: v * params["scaling_factor"] for n, v in merged.items()}
    elif method == "iso_cts":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

        merged = iso_cts(tvs, params["common_space_fraction"], accelerator="cpu", exclude_keys=exclude)
        merged = {n: v * params["scaling_factor"] for n, v in merged.items()}
    elif method == "wudi":
        from fusion_bench.method.wudi.wudi import wudi_merging

        merged = wudi_merging(tvs, accelerator="cpu", iter_num=int(params["iter_num"]), exclude_keys=exclude)
        merged = {n: v.detach() for n, v in merged.items()}
    elif (
        method == "regmean"
    ):  # the models themselves (base + task vector) and their Grams (`gram<i>.<module>`)
        from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

        grams = load_file(params["grams"])
        count = len(tvs)
        by_param = {n: [base[n] + tvs[i][n] for i in range(count)] for n in base}
        per_model = [
            {k.split(".", 1)[1]: v for k, v in grams.items() if k.startswith(f"gram{i}.")}
            for i in range(count)
        ]
        merged = merging_with_regmean_weights(by_param, per_model, params["reduce_non_diagonal_ratio"])
        save_file({n: v.contiguous() for n, v in merged.items()}, out)
        return
    else:
        raise SystemExit(f"unknown method {method}")
    save_file({n: (base[n] + merged[n]).contiguous() for n in base}, out)


if __name__ == "__main__":
    main()
