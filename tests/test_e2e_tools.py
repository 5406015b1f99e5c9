"""The phase-3 end-to-end measurement's helpers: stamped log + timers (launch/e2e_main.py), its summary and
extrapolation (launch/e2e_summary.py), its inputs (launch/e2e_fixtures.py)."""
import io
import json

import numpy as np
import pytest

from launch import e2e_main
from launch.e2e_summary import extrapolate, summarize, target_counts

CONFIG = {"epochs": 1000, "chunk_epochs": 100, "checkpoint_freq": 1000, "eval": {"freq": 500, "episodes": 10}}


def _event(event, start, end, **kw):
    return [f"@{start:.3f} [timing] " + json.dumps({"event": event, "phase": "start", "start": start, "tag": kw.get("tag")}),
            f"@{end:.3f} [timing] " + json.dumps({"event": event, "start": start, "end": end, "seconds": end - start, **kw})]


def _run_log():
    """A 1,000-epoch run launched at t=1000: startup 20 s, a 50 s first chunk, then chunks of 0.2 s/epoch with 0.5 s
    between them, except the chunk beside evaluation 500 (25 s instead of 20); at the end a 3 s checkpoint (save 2 +
    wait 1) and a 60 s final evaluation (plain 10, planning 40, best-params 10), exit 2 s later."""
    lines = _event("eval_run", 1020.0, 1030.0, tag=[0, 42])
    t = 1070.0
    lines.append(f"@{t:.3f} [epoch 100/1000] 2.00 epochs/s, 60.0 task-epochs/s, ETA 0:06:00, actor_loss 1")
    for epoch in range(200, 1001, 100):
        dt = 25.0 if epoch == 600 else 20.0
        t += 0.5 + dt
        lines.append(f"@{t:.3f} [epoch {epoch}/1000] {100 / dt:.2f} epochs/s, 1.0 task-epochs/s, ETA 0:01:00, actor_loss 1")
        if epoch == 500:
            lines += _event("eval_run", t, t + 10.0, tag=[500, 42])
    assert t == 1259.5
    lines += _event("checkpoint_save", 1259.5, 1261.5, tag=1000) + _event("checkpoint_wait", 1261.5, 1262.5)
    final = _event("final_evaluation", 1262.5, 1322.5)
    lines += [final[0]] + _event("eval_run", 1262.5, 1272.5) + _event("planning_run", 1272.5, 1312.5, tag=["planning", 42])
    lines += _event("eval_run", 1312.5, 1322.5) + [final[1]]
    lines += _event("main_end", 1000.5, 1324.5)
    metrics = [{"epoch": 0, "task": "walker-stand", "seed": 42, "total_time": 50.0}]
    return lines, metrics


def test_target_counts_phase3():
    # evaluations at 0, 500, ..., 14500; the 14 at 1000..14000 coincide with a checkpoint and block
    assert target_counts(15_000, 500, 1000, 100) == {"chunks": 150, "evaluations": 30, "blocking_evaluations": 14,
                                                     "background_evaluations": 16, "checkpoints": 15}
    assert target_counts(1000, 500, 1000, 100) == {"chunks": 10, "evaluations": 2, "blocking_evaluations": 0,
                                                   "background_evaluations": 2, "checkpoints": 1}
    assert target_counts(1000, 500, 1000, 100, evaluate=False)["evaluations"] == 0


def test_summary_measures_each_part_and_extrapolates():
    lines, metrics = _run_log()
    s = summarize(lines, CONFIG, 1000.0, 0, 15_000, 500, metrics_rows=metrics)
    m = s["measured"]
    assert s["complete"] and m["epochs_done"] == 1000
    assert m["startup_s"] == pytest.approx(20.0) and m["first_chunk_s"] == pytest.approx(50.0)
    assert m["steady_s_per_epoch"] == pytest.approx(0.2) and m["compile_s"] == pytest.approx(30.0)
    assert m["chunk_gap_s"] == pytest.approx(0.5)
    assert [c["eval_overlap"] for c in m["chunks"]] == [True] + [False] * 4 + [True] + [False] * 4
    # (1262.5 - 1070) - 900 * 0.2 - 9 * 0.5 - 3 = 5 s for the 2 periodic evaluations
    assert m["periodic_evaluations_costed"] == 2 and m["eval_background_s"] == pytest.approx(2.5)
    assert m["eval_alone_s"] == pytest.approx(10.0) and m["eval_alone_from"] == "final plain evaluation"
    assert m["checkpoint_s"] == pytest.approx(3.0) and m["final_evaluation_s"] == pytest.approx(60.0)
    assert m["after_final_s"] == pytest.approx(2.0)
    assert [p["event"] for p in m["final_evaluation_parts"]] == ["eval_run", "planning_run", "eval_run"]
    x = s["extrapolation"]
    assert x["terms"] == {"startup_s": 20.0, "compile_s": 30.0, "training_s": 3000.0, "chunk_gaps_s": 74.5,
                          "background_evaluations_s": 40.0, "blocking_evaluations_s": 140.0, "checkpoints_s": 45.0,
                          "final_evaluation_s": 60.0, "after_final_s": 2.0}
    assert x["total_s"] == pytest.approx(3411.5) and not x["lower_bound"] and m["unfinished"] == []


def test_summary_of_a_run_stopped_in_its_final_evaluation_is_a_lower_bound():
    lines, metrics = _run_log()
    cut = next(i for i, line in enumerate(lines) if '"planning_run", "phase": "start"' in line)
    partial = lines[:cut + 1] + ["@1290.000 still planning"]
    s = summarize(partial, CONFIG, 1000.0, None, 15_000, 500, metrics_rows=metrics)
    assert not s["complete"]
    x, m = s["extrapolation"], s["measured"]
    assert {u["event"]: u["at_least_s"] for u in m["unfinished"]} == {"final_evaluation": 27.5, "planning_run": 17.5}
    assert x["terms"]["final_evaluation_s"] == pytest.approx(27.5) and x["terms"]["after_final_s"] is None
    assert x["lower_bound"] and "final_evaluation_s (at least)" in x["terms_missing"]
    assert m["eval_background_s"] == pytest.approx(2.5)  # the loop up to the final evaluation is all there


def test_summary_of_a_run_stopped_in_training_misses_the_tail():
    lines, metrics = _run_log()
    cut = next(i for i, line in enumerate(lines) if "[epoch 700/1000]" in line)
    s = summarize(lines[:cut + 1], CONFIG, 1000.0, 124, 15_000, 500, metrics_rows=metrics)
    x, m = s["extrapolation"], s["measured"]
    assert m["epochs_done"] == 700 and not s["complete"]
    assert m["eval_background_s"] == pytest.approx(2.5)  # (1198 - 1070) - 600 * 0.2 - 6 * 0.5 = 5 s
    assert m["eval_alone_from"].startswith("periodic") and m["eval_alone_s"] == pytest.approx(10.0)
    assert x["terms"]["checkpoints_s"] is None and x["terms"]["final_evaluation_s"] is None
    assert x["lower_bound"] and {"checkpoints_s", "final_evaluation_s", "after_final_s"} <= set(x["terms_missing"])
    assert x["terms"]["training_s"] == pytest.approx(3000.0)  # the steady rate is already known


def test_extrapolate_counts_zero_terms_as_zero_not_missing():
    m = {"startup_s": 1.0, "compile_s": 2.0, "steady_s_per_epoch": 0.5, "chunk_gap_s": 0.0, "eval_background_s": None,
         "eval_alone_s": None, "checkpoint_s": 1.0, "final_evaluation_s": 3.0, "after_final_s": 0.5, "unfinished": []}
    counts = {"chunks": 1, "background_evaluations": 0, "blocking_evaluations": 0, "checkpoints": 1}
    x = extrapolate(m, counts, 10)
    assert x["total_s"] == 12.5 and not x["lower_bound"]


def test_stamped_stream_prefixes_whole_lines_only():
    buf, clock = io.StringIO(), iter([5.0, 6.5])
    s = e2e_main.StampedStream(buf, clock=lambda: next(clock))
    s.write("a")
    s.write("b\nc\nd")
    assert buf.getvalue() == "@5.000 ab\n@5.000 c\n"
    s.close_line()
    assert buf.getvalue().endswith("@6.500 d\n")


def test_timed_prints_start_and_end_events_and_reraises(capsys):
    class Result:
        wall_time_s, policy_time_s = 1.25, 0.5

    ok = e2e_main.timed("eval_run", lambda self, params, seed=0, tag=None: Result(), e2e_main._eval_tag)
    assert isinstance(ok(None, {}, seed=1, tag=(0, 42)), Result)

    def boom():
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        e2e_main.timed("final_evaluation", boom)()
    events = [json.loads(line[len(e2e_main.TIMING_TAG):]) for line in capsys.readouterr().out.splitlines()]
    assert [(e["event"], e.get("phase")) for e in events] == [("eval_run", "start"), ("eval_run", None),
                                                            ("final_evaluation", "start"), ("final_evaluation", None)]
    assert events[1]["tag"] == [0, 42] and events[1]["wall_time_s"] == 1.25 and events[1]["ok"]
    assert events[3]["ok"] is False


def test_install_timers_wraps_once_and_reports_missing_targets():
    import types

    mod = types.ModuleType("fake_e2e_target")
    mod.Thing = type("Thing", (), {"run": lambda self: 1})
    import sys

    sys.modules["fake_e2e_target"] = mod
    try:
        logged = []
        targets = (("eval_run", "fake_e2e_target", "Thing.run", None), ("x", "fake_e2e_target", "Gone.run", None))
        assert e2e_main.install_timers(targets, log=logged.append) == ["fake_e2e_target.Thing.run"]
        first = mod.Thing.run
        e2e_main.install_timers(targets, log=logged.append)
        assert mod.Thing.run is first and getattr(first, "__e2e_timed__", False)
        assert len(logged) == 2 and all('"missing"' in line and "Gone.run" in line for line in logged)
    finally:
        del sys.modules["fake_e2e_target"]


def test_fixtures_store_and_checkpoint_load_as_phase3_inputs(tmp_path):
    from convert_ckpt.api import load_world_model
    from fmbpo_jax.data.store import open_store
    from launch.e2e_fixtures import phase3_wm_config, write_random_checkpoint, write_random_store

    store = write_random_store(str(tmp_path / "store"), [0, 7], episodes=2, episode_length=20)
    assert sorted(store.tasks) == [0, 7]
    s = open_store(str(tmp_path / "store"))
    obs = np.load(f"{s.data_dir}/t07_obs.npy")  # pendulum-swingup: 3 own obs dims, zero padding after
    assert obs.shape == (2, 20, 24) and np.all(obs[..., 3:] == 0) and np.all(np.abs(obs[..., :3]).max() > 0)
    write_random_checkpoint(str(tmp_path / "wm"), "tiny")
    cfg, params, extras = load_world_model(str(tmp_path / "wm"))
    want = phase3_wm_config("tiny")
    assert (cfg.latent_dim, cfg.units, cfg.num_tasks) == (want.latent_dim, want.units, 30)
    assert extras["tasks"][0] == "walker-stand"
