"""fmbpo_jax.report on two real tiny runs: the tables' numbers against the logs, the figures, the CLI,
and the pieces (reference matching, IQM) on their own (the FLOP model: test_flops.py)."""
from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np
import pytest

from fmbpo_jax.tools import flops, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tiny_store, tmp_path_factory):
    """Two variants of MLP WM + Gaussian actor (frozen WM, 10 epochs, seeds 1 and 2): the fixed and the reference preset.

    Same shapes in both, so the second run reuses most of the first one's compilations.
    """
    from conftest import tiny_config
    from fmbpo_jax.training.trainer import train

    root = tmp_path_factory.mktemp("report_runs")
    common = {"behaviour.planning_eval": "plain", "epochs": 10, "chunk_epochs": 5, "log_freq": 5, "eval.freq": 5,
              "checkpoint_freq": 10, "seeds": "1,2"}
    a, b = str(root / "fixed"), str(root / "reference")
    train(tiny_config(tiny_store, **common), a, log=lambda s: None)
    train(tiny_config(tiny_store, **common, preset="reference"), b, log=lambda s: None)
    return a, b


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(24)
    # signature, then the IHDR chunk with a non-zero width and height
    return (head[:8] == PNG_MAGIC and head[12:16] == b"IHDR" and int.from_bytes(head[16:20], "big") > 0
            and int.from_bytes(head[20:24], "big") > 0)


def test_report_numbers_match_the_logs(two_runs, tmp_path):
    out = str(tmp_path / "report")
    data = report.build_report(list(two_runs), out, fmt="html")
    assert len(data["variants"]) == 2
    md = open(data["report_md"]).read()
    for workdir in two_runs:
        v = next(v for v in data["variants"].values() if workdir in v["workdirs"])
        section = md.split(f"### {v['label']}\n", 1)[1].split("\n#", 1)[0]  # this variant's per-task table
        results = _read_csv(os.path.join(workdir, "results.csv"))
        evals = _read_jsonl(os.path.join(workdir, "eval.jsonl"))
        metrics = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        tasks = sorted({r["task"] for r in results})
        assert sorted(v["tasks"]) == tasks
        finals_all = []
        for t in tasks:
            rows = [r for r in results if r["task"] == t]
            final = [float(r["final_return"]) for r in rows]
            finals_all += final
            best = [max(e["episode_reward"] for e in evals if e["task"] == t and e["seed"] == int(r["seed"])) for r in rows]
            plan = [float(r["planning_return"]) for r in rows]
            succ = [float(r["final_success"]) for r in rows]
            got = v["tasks"][t]
            assert got["n"] == len(rows)
            assert got["final_mean"] == pytest.approx(np.mean(final))
            assert got["final_std"] == pytest.approx(np.std(final, ddof=1) if len(final) > 1 else 0.0)
            assert got["best_mean"] == pytest.approx(np.mean(best), rel=1e-6)  # float32 in results.csv
            assert got["planning_mean"] == pytest.approx(np.mean(plan))
            assert got["final_success_mean"] == pytest.approx(np.mean(succ))
            # and the markdown table row says the same, to one decimal
            row = next(line for line in section.splitlines() if line.startswith(f"| {t} |"))
            assert f"| {np.mean(final):.1f} ± {(np.std(final, ddof=1) if len(final) > 1 else 0.0):.1f} |" in row
            assert f"| {np.mean(best):.1f} ±" in row and f"| {np.mean(plan):.1f} ±" in row
        agg = v["aggregate"]
        assert agg["runs"] == len(results) and agg["tasks"] == len(tasks)
        assert agg["final_mean"] == pytest.approx(np.mean(finals_all))
        s = np.sort(finals_all)
        cut = int(0.25 * len(s))
        assert agg["final_iqm"] == pytest.approx(np.mean(s[cut:len(s) - cut]))
        # timing and compute: from total_time and the FLOP formula
        wall = max(r["total_time"] for r in metrics)
        assert v["timing"]["wall_s"] == pytest.approx(wall)
        assert v["timing"]["epochs_done"] == 10
        assert v["timing"]["task_epochs_per_s"] == pytest.approx(len(results) * 10 / wall)
        cfg = json.load(open(os.path.join(workdir, "config.json")))
        assert v["compute"]["flops_per_epoch"] == pytest.approx(flops.from_config_dict(cfg)["needed"])
        assert v["compute"]["return_per_gpu_hour"] == pytest.approx(np.mean(finals_all) / (wall / 3600 / len(results)))
        assert v["reference"] is None  # phase 0: nothing recorded to compare with
    for name in ("eval_curves", "loss_curves", "final_return_bars"):
        path = data["figures"][name]
        assert os.path.getsize(path) > 5000 and _is_png(path), name
        assert f"]({os.path.basename(path)})" in md
    page = open(data["report_html"]).read()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page


def test_cli_and_reference_column(two_runs, tmp_path):
    """Relabel one run as phase 3 (frozen MLP WM + Gaussian): its tables gain the section-8 numbers."""
    import shutil

    src = two_runs[0]
    dst = tmp_path / "as_phase3"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = json.load(open(dst / "config.json"))
    cfg["phase"] = 3
    json.dump(cfg, open(dst / "config.json", "w"))
    # a results row for a reference task, so the reference column has a number to sit next to
    rows = _read_csv(dst / "results.csv")
    for r in rows:
        if r["task"] == "walker-stand":
            r["final_return"] = "900.0"
    with open(dst / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    assert report.main([str(dst), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "3 baseline (frozen PWM WM)" in md
    assert re.search(r"\| walker-stand \| 2 \| 900\.0 ± 0\.0 \|.*\| 957\.7 \|", md)
    assert "| reacher-easy | 2 |" in md and "| 982.3 |" in md
    assert not (out / "report.html").exists()
    assert report.main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_incomplete_run_uses_the_last_evaluation(two_runs, tmp_path):
    import shutil

    dst = tmp_path / "running"
    shutil.copytree(two_runs[1], dst, ignore=shutil.ignore_patterns("checkpoints"))
    os.remove(dst / "results.csv")
    data = report.collect([str(dst)])
    (v,) = data["variants"].values()
    evals = _read_jsonl(dst / "eval.jsonl")
    last = max(e["epoch"] for e in evals)
    for t, row in v["tasks"].items():
        assert row["incomplete"] == row["n"] == 2
        assert row["final_mean"] == pytest.approx(np.mean([e["episode_reward"] for e in evals if e["task"] == t and e["epoch"] == last]))
        assert math.isnan(row["planning_mean"])
    assert not v["timing"]["complete"]


def test_diagnostics_jsonl_gets_a_table_and_a_figure(two_runs, tmp_path):
    """Rows as the trainer writes them (fmbpo_jax.diagnostics.epoch_diagnostics per run, every N epochs)."""
    import shutil

    dst = tmp_path / "diag"
    shutil.copytree(two_runs[0], dst, ignore=shutil.ignore_patterns("checkpoints"))
    rows = [{"epoch": e, "task": t, "seed": s, "total_time": 1.0, "actor_esnr": 10.0 ** (db / 10), "actor_esnr_db": db,
             "wm_jac_z": 0.5 + e / 100, "wm_jac_a": 0.1, "actor_grad_norm/mu_net": 1.0}
            for e, db in ((5, 3.0), (10, 1.0)) for t in ("walker-stand", "reacher-easy") for s in (1, 2)]
    with open(dst / "diagnostics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    data = report.build_report([str(dst)], str(tmp_path / "out"))
    assert _is_png(data["figures"]["diagnostics"])
    md = open(data["report_md"]).read()
    assert "## Diagnostics" in md and "3 → 1 (epochs 5 → 10)" in md and "0.55 → 0.6 (epochs 5 → 10)" in md


# ----------------------------------------------------------------------------------- pure pieces


def _phase_config(module: str, variant=None, **over) -> dict:
    import importlib

    m = importlib.import_module(f"configs.{module}")
    c = (m.get_config(variant) if variant else m.get_config()).to_dict()
    c.update(over)
    return c


def test_reference_rows_match_phase_and_variant():
    assert report.reference_row(_phase_config("phase3", "baseline"))["label"].startswith("3 baseline")
    assert report.reference_row(_phase_config("phase3", "flowpolicy"))["label"].startswith("3 flow policy")
    assert report.reference_row(_phase_config("phase4"))["phase"] == 4
    assert "euler" in report.reference_row(_phase_config("phase5", "euler_fast"))["label"]
    assert report.reference_row(_phase_config("phase6", "baseline", epochs=50_000))["epochs"] == 50_000
    assert report.reference_row(_phase_config("phase6", "fullflow"))["label"].startswith("6 fullflow")
    assert "flow_high" in report.reference_row(_phase_config("phase7", "flow_high"))["label"]
    assert report.reference_row(_phase_config("phase9", "cond3")) is None  # nothing recorded
    assert report.reference_row(_phase_config("phase4", epochs=10)) is not None  # nearest epochs
    assert report.ref_number("≈0.23") == 0.23 and report.ref_number("0.16-4.08") is None


def test_pretraining_run_directory(tmp_path):
    d = tmp_path / "phase8_flow"
    d.mkdir()
    json.dump(_phase_config("phase8", "flow"), open(d / "config.json", "w"))
    with open(d / "pretrain.jsonl", "w") as f:
        for i, loss in ((1000, 3.0), (2000, 1.5), (3000, 2.0)):
            f.write(json.dumps({"iter": i, "wm_loss": loss, "elapsed_sec": i / 100}) + "\n")
    data = report.build_report([str(d)], str(tmp_path / "out"))
    (v,) = data["variants"].values()
    assert v["pretrain"]["best_wm_loss"] == 1.5 and v["pretrain"]["best_iter"] == 2000
    assert v["pretrain"]["reference"] == report.REFERENCE_PRETRAIN["flow"]
    assert "| 1.5000 | 2000 |" in open(data["report_md"]).read() and _is_png(data["figures"]["pretrain_loss"])


def test_iqm_is_scipys_trim_mean():
    x = [5.0, 1.0, 9.0, 3.0, 7.0, 100.0, -50.0, 2.0]
    s = sorted(x)
    assert report.iqm(x) == pytest.approx(np.mean(s[2:6]))
    assert report.iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)
