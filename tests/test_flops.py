"""The FLOP model (fmbpo_jax.tools.flops), tested once: hand counts, scaling, the two config readers against each
other, the recorded GPU rows, and the matmuls XLA actually compiles for a tiny epoch."""
from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import os

import jax
import jax.numpy as jnp
import pytest

from fmbpo_jax.run_config import pwm_config
from fmbpo_jax.tools import bench, flops
from fmbpo_jax.tools.bench.plan import compile_row, lower_row
from fmbpo_jax.tools.hlo_flops import dot_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_RESULTS = os.path.join(ROOT, "docs", "results", "h200_2026-11-28")


def _flops(variant: str, size: str = "48M", batch: int = 512, mode: str = "policy", **kw) -> dict:
    cfg = pwm_config(bench.build_config(size, variant, **kw))
    return flops.from_pwm_config(cfg, batch, 256, mode)


def _phase_config(module: str, variant=None, **over) -> dict:
    m = importlib.import_module(f"configs.{module}")
    c = (m.get_config(variant) if variant else m.get_config()).to_dict()
    c.update(over)
    return c


# A tiny architecture, small enough to count by hand: obs 3, action 2, latent 4, task embedding 1.
TINY = flops.Architecture(obs_dim=3, action_dim=2, latent_dim=4, task_dim=1, num_bins=5, encoder_units=(6,),
                          wm_units=(7,), actor_units=(5,), critic_units=(3,), num_critics=2)


def test_dense_flops_formula():
    dims = flops.mlp_dims(10, [20], 3)
    assert dims == [(10, 20), (20, 3)]
    fwd = 2 * 5 * (10 * 20 + 20 * 3)
    assert flops.dense_flops(5, dims) == fwd
    assert flops.dense_flops(5, dims, dw=True, dx=True) == 3 * fwd  # backward = 2x forward
    assert flops.dense_flops(5, dims, dw=True, dx=True, dx_first_cols=0) == 3 * fwd - 2 * 5 * 10 * 20
    assert flops.dense_flops(5, dims, fwd=False, dx=True, dx_first_cols=4) == 2 * 5 * (4 * 20 + 20 * 3)


def test_hand_count_tiny_mlp_wm_gaussian_actor():
    """B=2, H=3, one WM step on the policy batch, 1 critic iteration x 2 batches; every matmul written out."""
    f = flops.epoch_flops(TINY, horizon=3, batch_size=2, critic_iterations=1, critic_batches=2, wm_steps=1, wm_batch_size=2)
    enc, dyn, rew, act, crit = 4 * 6 + 6 * 4, 7 * 7 + 7 * 4, 7 * 7 + 7 * 5, 4 * 5 + 5 * 2, 4 * 3 + 3 * 1  # MACs per row
    # WM step, 2 windows: encoder targets on 6 rows (fwd); z0 on 2 rows (fwd, dw, dx of layer 2 only);
    # dynamics and reward on 6 rows: fwd, dw, dx of layer 2 and of the first layer's z + emb columns (5 of 7)
    wm = (2 * 6 * enc + 2 * 2 * enc * 2 + 2 * 2 * 6 * 4
          + 2 * 6 * dyn * 2 + 2 * 6 * 7 * 4 + 2 * 6 * 5 * 7
          + 2 * 6 * rew * 2 + 2 * 6 * 7 * 5 + 2 * 6 * 5 * 7)
    # actor step: encoder fwd on 2 rows; actor on 6 rows (fwd, dw, dx of layer 2: z is detached); dynamics and
    # reward on 6 rows (fwd, dx of layer 2 and of the z + a columns, 6 of 7); critic fwd on 6 rows x 2 members,
    # dx of the terminal one (2 rows x 2 members)
    actor = (2 * 2 * enc + 2 * 6 * act * 2 + 2 * 6 * 5 * 2
             + 2 * 6 * dyn + 2 * 6 * 7 * 4 + 2 * 6 * 6 * 7
             + 2 * 6 * rew + 2 * 6 * 7 * 5 + 2 * 6 * 6 * 7
             + 2 * 12 * crit + 2 * 4 * crit)
    critic = 2 * 12 * crit * 2 + 2 * 12 * 3 * 1  # 1 x 2 steps of 3 rows x 2 members: fwd, dw, dx of layer 2
    assert {k: v["needed"] for k, v in f["parts"].items()} == {"wm": wm, "actor_step": actor, "critic_steps": critic}
    assert f["needed"] == wm + actor + critic == 12516
    # naive: whole input gradients; the actor step adds WM (and encoder) weight grads and critic backward on all rows
    naive_wm = 2 * 6 * enc + 2 * 2 * enc * 2 + 2 * 2 * 6 * 4 + 3 * 2 * 6 * dyn + 3 * 2 * 6 * rew
    naive_actor = (2 * 2 * enc + 2 * 6 * act * 2 + 2 * 6 * 5 * 2 + 3 * 2 * 6 * dyn + 3 * 2 * 6 * rew
                   + 2 * 2 * enc + 2 * 2 * 6 * 4 + 3 * 2 * 12 * crit)
    assert (f["parts"]["wm"]["naive"], f["parts"]["actor_step"]["naive"], f["parts"]["critic_steps"]["naive"]) == (
        naive_wm, naive_actor, critic)


def test_hand_count_tiny_flow_models_and_teacher_forcing():
    """Flow WM Heun K=2 (4 velocity calls per macro step), flow actor Euler K=3 (3 calls per action)."""
    flow = flops.Architecture(**{**TINY.__dict__, "wm_kind": "flow", "wm_integrator": "heun", "wm_substeps": 2,
                                 "actor_kind": "flow", "actor_integrator": "euler", "actor_substeps": 3})
    assert (flow.wm_evals, flow.actor_evals) == (4, 3)
    vel, rew, act = 8 * 7 + 7 * 4, 7 * 7 + 7 * 5, 7 * 5 + 5 * 2  # velocity [z, a, tau, emb]; actor [z, a_tau, tau]
    actor = flops.actor_step_flops(flow, horizon=3, batch_size=2)[0]
    enc = 4 * 6 + 6 * 4
    crit = 4 * 3 + 3 * 1
    assert actor == (2 * 2 * enc
                     + 2 * 18 * act * 2 + 2 * 18 * 5 * 2 + 2 * 18 * 2 * 5  # 6 actions x 3 calls; dx of the a_tau columns
                     + 2 * 24 * vel + 2 * 24 * 7 * 4 + 2 * 24 * 6 * 7  # 6 steps x 4 velocity calls
                     + 2 * 6 * rew + 2 * 6 * 7 * 5 + 2 * 6 * 6 * 7 + 2 * 12 * crit + 2 * 4 * crit)
    # WM loss: per step 1 flow-matching call + 4 rollout calls; with teacher forcing the flow-matching call only,
    # and only step 0's source (z0) needs a z input gradient (5 of 8 columns), later ones the emb column alone
    roll = flops.wm_step_flops(flow, horizon=3, sequences=2)[0]
    tf = flops.wm_step_flops(flow, horizon=3, sequences=2, teacher_forcing=True)[0]
    targets_z0 = 2 * 6 * enc + 2 * 2 * enc * 2 + 2 * 2 * 6 * 4
    rew_rollout = 2 * 6 * rew * 2 + 2 * 6 * 7 * 5 + 2 * 6 * 5 * 7
    assert roll == targets_z0 + 2 * 30 * vel * 2 + 2 * 30 * 7 * 4 + 2 * 30 * 5 * 7 + rew_rollout
    assert tf == (targets_z0 + 2 * 6 * vel * 2 + 2 * 6 * 7 * 4 + 2 * 2 * 5 * 7 + 2 * 4 * 1 * 7
                  + 2 * 6 * rew * 2 + 2 * 6 * 7 * 5 + 2 * 2 * 5 * 7 + 2 * 4 * 1 * 7)


def test_hand_count_48m_phase3():
    """Phase-3 baseline at 48M (frozen MLP WM, Gaussian actor), from its config.json-style dict."""
    c = _phase_config("phase3", "baseline")
    L, E, O, A, B, H, C = 768, 64, 24, 6, 512, 16, 3
    enc = (O + E) * 1792 + 1792 * 1792 * 2 + 1792 * L
    dyn = (L + E + A) * 1792 + 1792 * 1792 + 1792 * L
    rew = (L + A + E) * 1792 + 1792 * 1792 + 1792 * 101
    act = L * 400 + 400 * 200 + 200 * 100 + 100 * A
    crit = C * (L * 400 + 400 * 200 + 200 * 1)
    actor = (2 * B * enc + H * B * (6 * act - 2 * L * 400)  # actor: no input gradient of the detached z
             + 2 * H * B * dyn + 2 * H * B * (dyn - E * 1792)  # WM: forward + input grads wrt (z, a), not emb
             + 2 * H * B * rew + 2 * H * B * (rew - E * 1792)
             + 2 * H * B * crit + 2 * B * crit)  # critic targets (forward) + terminal input gradient
    rows = 8 * (B * H // 4) * 4
    critic = 2 * rows * (3 * crit - C * L * 400)  # fwd, dw, dx of all but the first layer (z is data)
    parts = flops.from_config_dict(c)["parts"]
    assert set(parts) == {"actor_step", "critic_steps"}
    assert parts["actor_step"]["needed"] == actor and parts["critic_steps"]["needed"] == critic
    # fine-tuning a Heun K=4 flow WM with wm_iterations=8 x 256 adds WM-loss FLOPs; Euler halves the rollout
    heun = flops.from_config_dict(_phase_config("phase4"))["parts"]
    p4 = _phase_config("phase4")
    euler = flops.from_config_dict(_phase_config("phase4", model=dict(p4["model"], wm_integrator="euler",
                                                                      actor_integrator="euler")))["parts"]
    assert heun["wm"]["needed"] > 0 and euler["wm"]["needed"] < heun["wm"]["needed"]
    assert euler["actor_step"]["needed"] < heun["actor_step"]["needed"]


def test_epoch_flops_scaling():
    for v in ("baseline-frozen", "baseline-finetune", "fullflow-finetune-k8k4"):
        one, two = _flops(v, batch=512), _flops(v, batch=1024)
        assert two["needed"] == pytest.approx(2 * one["needed"], rel=1e-12)  # doubling the batch doubles FLOPs
        assert two["naive"] == pytest.approx(2 * one["naive"], rel=1e-12)
        assert 0 < one["needed"] <= one["naive"]
    assert _flops("baseline-frozen")["needed"] < _flops("baseline-finetune")["needed"]  # frozen < fine-tune
    assert _flops("baseline-frozen")["needed"] < _flops("flowpolicy-frozen")["needed"]
    assert _flops("fullflow-finetune-k4k2")["needed"] < _flops("fullflow-finetune-k8k4")["needed"]  # K8 > K4
    assert _flops("baseline-finetune")["needed"] < _flops("fullflow-finetune-k4k2")["needed"]
    assert _flops("baseline-frozen", size="5M")["needed"] < _flops("baseline-frozen")["needed"]
    # the fixed preset's 8 x 256 WM sequences are 4x the reference's 512
    ref, fixed = _flops("baseline-finetune"), _flops("baseline-finetune", wm_updates="iterations")
    assert fixed["parts"]["wm"]["needed"] == pytest.approx(4 * ref["parts"]["wm"]["needed"], rel=1e-12)
    # the reference's accumulated embedding gradient (B22) makes both losses differentiate the task embedding
    fresh = flops.from_pwm_config(dataclasses.replace(pwm_config(bench.build_config("48M", "baseline-finetune")),
                                                      wm_emb_grad="fresh"), 512, 256)
    assert fresh["parts"]["wm"]["needed"] < ref["parts"]["wm"]["needed"]
    assert fresh["parts"]["actor_step"]["needed"] < ref["parts"]["actor_step"]["needed"]
    pre = _flops("wm-pretrain", batch=1024, mode="pretrain")
    assert set(pre["parts"]) == {"wm"}
    assert pre["needed"] == pytest.approx(2 * fresh["parts"]["wm"]["needed"], rel=1e-12)


def test_epoch_flops_48m_magnitudes():
    """About 765 needed / 1,100 naive GFLOP per frozen-WM epoch; 5,300 / 6,300 full flow (K4/K2), 48M."""
    frozen, flow = _flops("baseline-frozen"), _flops("fullflow-finetune-k4k2")
    assert 650e9 < frozen["needed"] < 850e9 and 900e9 < frozen["naive"] < 1200e9
    assert 4700e9 < flow["needed"] < 5800e9 and 5700e9 < flow["naive"] < 6900e9


@pytest.mark.parametrize("phase,variant", [("phase3", "baseline"), ("phase3", "flowpolicy"), ("phase4", None),
                                           ("phase5", "euler_fast"), ("phase6", "fullflow"), ("phase7", "flow_high"),
                                           ("phase9", "cond3")])
@pytest.mark.parametrize("preset", ["reference", "fixed"])
def test_config_dict_and_pwm_config_give_the_same_flops(phase, variant, preset):
    """The report reads config.json, the bench a PWMConfig: the same numbers for the same config."""
    m = importlib.import_module(f"configs.{phase}")
    c = m.get_config(variant) if variant else m.get_config()
    c.preset = preset
    assert flops.from_config_dict(c.to_dict()) == flops.from_pwm_config(pwm_config(c), c.alg.batch_size, c.alg.wm_batch_size)


def test_recorded_gpu_rows_are_reproduced():
    """Every FLOP field of the 2026-11-28 H200 rows (bench JSON) comes out of the model again, to the last digit.

    Those rows predate B22 (the reference's accumulated task-embedding gradient): the program they measured
    took no embedding gradient, i.e. today's wm_emb_grad='fresh'."""
    rows = [r for path in sorted(glob.glob(os.path.join(GPU_RESULTS, "*.json")))
            for r in json.load(open(path))["rows"] if r.get("status") == "done"]
    assert len(rows) >= 15
    for r in rows:
        cfg = bench.build_config(r["size"], r["variant"], r["preset"])
        assert (cfg.alg.batch_size, cfg.alg.horizon) == (r["batch_size"], r["horizon"])
        pcfg = dataclasses.replace(pwm_config(cfg), wm_emb_grad="fresh")
        f = flops.from_pwm_config(pcfg, r["batch_size"], cfg.alg.wm_batch_size, r["mode"])
        assert r["gflop_epoch"] == pytest.approx(f["needed"] * r["runs"] / 1e9, rel=1e-13), r["variant"]
        assert r["gflop_naive_epoch"] == pytest.approx(f["naive"] * r["runs"] / 1e9, rel=1e-13)
        assert r["gflop_parts_per_run"] == {p: {k: pytest.approx(x / 1e9, rel=1e-13) for k, x in v.items()}
                                            for p, v in f["parts"].items()}


def test_hlo_dot_flops_counts_every_scan_step():
    """XLA's cost_analysis counts a scan body once; the HLO walk multiplies by the trip count."""
    def f(w, x):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=10)[0].sum()

    w, x = jnp.ones((64, 64)), jnp.ones((32, 64))
    compiled = jax.jit(jax.grad(f)).lower(w, x).compile()
    # forward, input gradient (for the carry) and weight gradient of a 32x64 @ 64x64 matmul, 10 times
    assert dot_flops(compiled.as_text()) == 3 * 10 * 2 * 32 * 64 * 64
    assert compiled.cost_analysis()["flops"] < 0.2 * dot_flops(compiled.as_text())


TINY_CONFIG = '''
from configs.base import get_config as base


def get_config():
    c = base()
    c.model.size = "custom"
    c.model.latent_dim, c.model.task_dim, c.model.num_bins, c.model.num_critics = 16, 4, 11, 2
    c.model.encoder_units, c.model.units, c.model.flow_units = (32,), (32, 32), (32, 32)
    c.model.actor_units, c.model.critic_units = (32, 16), (32, 16)
    return c
'''


def _autodiff_extra(arch: flops.Architecture, H: int, B: int, wm_rows: int, train_task_emb: bool,
                    emb_grad: bool = False) -> float:
    """What JAX's autodiff computes beyond `needed`: the whole input gradient of a first layer where only some
    columns need one (the concatenation's cotangent is one matmul), and one more critic forward for the terminal
    value (the rollout already evaluated V(z_H) for the targets). emb_grad (B22): the embedding's columns are needed."""
    d = flops.layer_dims(arch)
    O, A, L, E = arch.obs_dim, arch.action_dim, arch.latent_dim, arch.task_dim
    tau = 1 if arch.wm_kind == "flow" else 0
    untrained_emb = 0 if (train_task_emb or emb_grad) else E
    actor_emb = 0 if emb_grad else E
    wm_calls = (1 + arch.wm_evals) if arch.wm_kind == "flow" else 1
    extra = 0.0
    if wm_rows:  # WM step: encoder z0 [obs, emb]; dynamics/velocity [.., a, (tau), ..]; reward [.., a, ..]
        extra += 2 * wm_rows * (O + E) * d["enc"][0][1]
        extra += 2 * H * wm_rows * wm_calls * (A + tau + untrained_emb) * d["dyn"][0][1]
        extra += 2 * H * wm_rows * (A + untrained_emb) * d["rew"][0][1]
    extra += 2 * H * B * arch.wm_evals * (actor_emb + tau) * d["dyn"][0][1] + 2 * H * B * actor_emb * d["rew"][0][1]
    if emb_grad:  # the actor step's encoder: the obs columns of its first layer's input gradient
        extra += 2 * B * O * d["enc"][0][1]
    if arch.actor_kind == "flow":  # the velocity net's [z, tau] columns
        extra += 2 * H * B * arch.actor_evals * (L + 1) * d["actor"][0][1]
    return extra + flops.dense_flops(B * arch.num_critics, d["critic"])


@pytest.mark.parametrize("variant", ["baseline-finetune", "fullflow-finetune-k4k2"])
def test_model_matches_the_matmuls_xla_compiles(tmp_path, variant):
    """A tiny epoch (the bench's program: train.make_train_chunk, 1 epoch, 1 run), reference preset.

    XLA's matmul FLOPs = needed + the autodiff extras above, within 0.5% (XLA turns a few matrix-vector products,
    e.g. the critic's last layer, into reductions the HLO walk does not count); and needed <= XLA <= naive.
    """
    path = tmp_path / "tiny_cfg.py"
    path.write_text(TINY_CONFIG)
    args = bench.parse_args(["--variant", variant, "--size", str(path), "--epochs-per-call", "1", "--batch-size", "16",
                             "--horizon", "4", "--critic-iterations", "2", "--preset", "reference"])
    r = bench.plan_row(args, variant, str(path), 1, "fp32-highest")
    lower_row(r)
    compile_row(r)
    xla = dot_flops(r.compiled.as_text())
    need, naive = r.flops["needed"], r.flops["naive"]
    extra = _autodiff_extra(flops.architecture_of(r.pcfg), 4, 16, 16, r.pcfg.train_task_emb,
                            r.pcfg.accumulates_emb_grad)
    assert xla == pytest.approx(need + extra, rel=5e-3)
    assert need < xla < naive
