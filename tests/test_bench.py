"""The benchmark CLI: fields of a real tiny run, the row plan, the profile summary (the FLOP model: test_flops.py).

Speed itself is never asserted here: only that the bench measures and reports.
"""
from __future__ import annotations

import glob
import json
import os

import pytest

from fmbpo_jax import run_config
from fmbpo_jax.tools import bench
from fmbpo_jax.tools.bench import plan


def test_summarize_trace_ranks_program_ops_and_names_their_source():
    hlo = ('''  %ynn_fusion.3 = f32[512,1792]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(chunk)/WMMLP/1/dot_general" x=1}
  %add_fusion = f32[8]{0} fusion(%c), kind=kLoop, metadata={op_name="jit(chunk)/critic/add"}''')
    events = [{"ph": "X", "name": "ynn_fusion.3", "dur": 700.0}, {"ph": "X", "name": "ynn_fusion.3", "dur": 500.0},
              {"ph": "X", "name": "add_fusion", "dur": 2000.0}, {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},
              {"ph": "X", "name": "$bench.py:1 main", "dur": 9e6}, {"ph": "i", "name": "ynn_fusion.3"},
              {"ph": "X", "name": "copy.1", "dur": 10.0}]
    ops = bench.summarize_trace(events, hlo, top=2)
    assert [o["op"] for o in ops] == ["add_fusion", "ynn_fusion.3"]  # runtime events and instants left out
    assert ops[1]["ms"] == pytest.approx(1.2) and ops[1]["calls"] == 2
    assert ops[1]["shape"] == "f32[512,1792]{1,0}" and ops[1]["source"] == "jit(chunk)/WMMLP/1/dot_general"
    assert bench.summarize_trace(events, "", top=5)[-1] == {"op": "copy.1", "ms": 0.01, "calls": 1, "shape": "", "source": ""}


def test_cli_arguments():
    a = bench.parse_args(["--variant", "main", "--tasks", "1,30", "--precision", "fp32-highest,bf16", "--remat", "on"])
    assert a.variants == list(bench.MAIN_VARIANTS) and a.task_counts == [1, 30] and a.precisions == ["fp32-highest", "bf16"]
    assert [bench.parse_args(["--remat", r]).remat for r in ("off", "matmul_inputs")] == ["off", "matmul_inputs"]
    configs = {r: plan.row_config(bench.parse_args(["--remat", r]), "baseline-frozen", "tiny", "bf16")
               for r in ("off", "on", "matmul_inputs")}
    assert {r: (c.remat, run_config.remat_setting(c)) for r, c in configs.items()} == \
        {"off": (False, "all"), "on": (True, "step"), "matmul_inputs": (False, "matmul_inputs")}
    for bad in (["--variant", "nope"], ["--tasks", "31"], ["--precision", "fp8"], ["--remat", "maybe"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_bench_tiny_run_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--variant", "baseline-frozen", "--size", "tiny", "--tasks", "2", "--batch-size", "16",
                      "--horizon", "4", "--critic-iterations", "1", "--epochs-per-call", "2", "--timed-calls", "1",
                      "--peak-shape", "256,256,256", "--json", str(out), "--quiet", "--profile", str(tmp_path / "prof")])
    data = json.loads(out.read_text())
    assert data["meta"]["backend"] and data["meta"]["peak"]["fp32-highest"]["best_flops"] > 0
    assert len(data["rows"]) == len(res["rows"]) == 1
    row = data["rows"][0]
    assert "error" not in row, row.get("error")
    assert (row["variant"], row["size"], row["tasks"], row["runs"], row["precision"]) == ("baseline-frozen", "tiny", 2, 2, "fp32-highest")
    for k in ("compile_s", "median_s_epoch", "min_s_epoch", "task_epochs_s", "gflop_epoch", "gflop_naive_epoch",
              "achieved_gflops", "peak_gflops", "mfu"):
        assert isinstance(row[k], (int, float)) and row[k] > 0, k
    assert row["min_s_epoch"] <= row["median_s_epoch"]
    assert row["task_epochs_s"] == pytest.approx(2 / row["median_s_epoch"])
    assert row["gflop_epoch"] <= row["gflop_naive_epoch"]
    assert row["peak_mem_gb"] == "n/a" or row["peak_mem_gb"] > 0
    assert row["remat"] == "off"
    # --profile: one more call traced into the row's directory, with its op table
    assert os.path.isfile(os.path.join(row["profile_dir"], "top_ops.txt"))
    assert isinstance(row["profile_top_ops"], list)
    assert glob.glob(os.path.join(row["profile_dir"], "**", "*.trace.json.gz"), recursive=True)
    table = bench.format_rows(data["rows"])
    assert "baseline-frozen" in table and "median s/ep" in table


def test_cli_rows_give_an_explicit_order():
    a = bench.parse_args(["--size", "48M", "--rows", "baseline-frozen:30:bf16,fullflow-finetune-k8k4:1:fp32-highest,"
                          "baseline-frozen:1:bf16:tiny"])
    assert bench.row_plan(a) == [("baseline-frozen", "48M", 30, "bf16"), ("fullflow-finetune-k8k4", "48M", 1, "fp32-highest"),
                                 ("baseline-frozen", "tiny", 1, "bf16")]
    assert a.precisions == ["bf16", "fp32-highest"] and a.task_counts == [1, 30]  # peaks follow the rows
    # without --rows: precision-major over the product
    b = bench.parse_args(["--variant", "baseline-frozen,baseline-finetune", "--tasks", "1,30", "--precision", "bf16,fp32-highest"])
    assert bench.row_plan(b)[:3] == [("baseline-frozen", "5M", 1, "bf16"), ("baseline-finetune", "5M", 1, "bf16"),
                                     ("baseline-frozen", "5M", 30, "bf16")]
    for bad in ("baseline-frozen:31:bf16", "nope:1:bf16", "baseline-frozen:1:fp8", "baseline-frozen:1", "baseline-frozen:x:bf16",
                "baseline-finetune:3:bf16:tiny:x", "baseline-finetune:3:bf16:tiny:1:2"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--rows", bad])


def test_cli_rows_chunk_field_overrides_the_task_chunk_of_that_row_only():
    """...:SIZE:CHUNK (SIZE may be empty): full flow x 30 tasks needs a smaller lax.map chunk than baseline fine-tuning."""
    a = bench.parse_args(["--size", "tiny", "--finetune-task-chunk", "2", "--batch-size", "8", "--horizon", "2",
                          "--rows", "fullflow-finetune-k4k2:3:fp32-highest::1,baseline-finetune:3:fp32-highest"])
    (ff, base) = bench.row_plan(a)
    assert ff == ("fullflow-finetune-k4k2", "tiny", 3, "fp32-highest")
    assert bench.plan_row(a, *ff).row["task_chunk"] == 1
    assert bench.plan_row(a, *base).row["task_chunk"] == 2  # --finetune-task-chunk still applies to the other row


def test_bench_pipelined_rows_are_timed_in_the_given_order(tmp_path):
    """--rows order, --compile-workers 2 --pipeline (time each row as soon as its program is ready)."""
    out = tmp_path / "bench.json"
    lines: list[str] = []
    bench.main(["--rows", "baseline-frozen:2:fp32-highest:tiny,baseline-frozen:1:fp32-highest:tiny", "--batch-size", "16",
                "--horizon", "4", "--critic-iterations", "1", "--epochs-per-call", "1", "--timed-calls", "1",
                "--peak-shape", "128,128,128", "--compile-workers", "2", "--pipeline", "--json", str(out)], log=lines.append)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tasks"], r["status"]) for r in rows] == [(2, "done"), (1, "done")], [r.get("error") for r in rows]
    assert all(r["timed_while_compiling"] and r["compile_s"] > 0 and r["median_s_epoch"] > 0 for r in rows)
    starts = [i for i, line in enumerate(lines) if line.startswith("... [")]
    assert len(starts) == 2 and "tasks=2" in lines[starts[0]] and "tasks=1" in lines[starts[1]]
    assert sum(" compiled baseline-frozen" in line for line in lines) == 2  # each compile logged when it finishes


def test_leftover_compiles_sees_running_worker_threads():
    import threading

    gate = threading.Event()
    worker = threading.Thread(target=gate.wait)  # a compile of a skipped row, still running
    helper = threading.Thread(target=gate.wait, daemon=True)  # daemon threads never hold the exit
    worker.start()
    helper.start()
    try:
        assert bench.leftover_compiles([threading.main_thread(), worker, helper])
        assert not bench.leftover_compiles([threading.main_thread(), helper])
    finally:
        gate.set()
        worker.join()
        helper.join()
    assert not bench.leftover_compiles([threading.main_thread(), worker])  # finished
