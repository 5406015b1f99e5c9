"""XLA program memory (compile only, nothing run) of the benchmark's baseline-frozen epoch under each rollout remat
policy: python docs/results/cpu_2026-12-05/remat/program_memory.py OUT.json [TASKS] (PYTHONPATH=repo root).

The program is the bench's (fmbpo_jax.bench --variant baseline-frozen --size 48M --precision bf16 --remat P
--epochs-per-call 1): batch 512, H=16, frozen 48M WM, TASKS runs vmapped. Numbers are XLA:CPU's memory analysis."""
from __future__ import annotations

import datetime
import json
import sys
import time

import jax

from fmbpo_jax.tools import bench
from fmbpo_jax.tools.bench.plan import compile_row, lower_row, plan_row

GB = 2**30


def measure(tasks: int, policy: str) -> dict:
    """One row: compile the epoch program and read XLA's memory analysis (GiB)."""
    args = bench.parse_args(["--variant", "baseline-frozen", "--size", "48M", "--tasks", str(tasks), "--precision", "bf16",
                             "--remat", policy, "--epochs-per-call", "1"])
    t0 = time.perf_counter()
    r = plan_row(args, "baseline-frozen", "48M", tasks, "bf16")
    lower_row(r)
    compile_row(r)
    m = r.compiled.memory_analysis()
    return {"remat": policy, "tasks": tasks, "runs": r.row["runs"], "batch_size": r.row["batch_size"],
            "horizon": r.row["horizon"], "compile_s": round(time.perf_counter() - t0, 1),
            "temp_gib": m.temp_size_in_bytes / GB, "argument_gib": m.argument_size_in_bytes / GB,
            "output_gib": m.output_size_in_bytes / GB, "alias_gib": m.alias_size_in_bytes / GB,
            "program_gib": r.row["program_mem_gb"]}


def main(out: str, tasks: int) -> None:
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "PYTHONPATH=. python " + " ".join(sys.argv), "backend": jax.default_backend(),
           "jax": jax.__version__, "program": "bench baseline-frozen 48M bf16, epochs_per_call 1", "rows": []}
    for policy in ("all", "matmul_inputs", "step"):
        res["rows"].append(measure(tasks, policy))
        print(json.dumps(res["rows"][-1]), flush=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)
