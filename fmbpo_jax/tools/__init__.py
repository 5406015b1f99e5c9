"""Tooling around the trainer: benchmarks, the FLOP model and the results report. Training never imports it.

    flops.py        the matmul FLOP model of an epoch (plain sizes in), used by the bench and the report
    hlo_flops.py    matmul FLOPs of a compiled XLA program, to check the model against
    bench/          python -m fmbpo_jax.bench        training speed (rows of variants x sizes x tasks x precisions)
    report/         python -m fmbpo_jax.report       tables and figures of trained run directories
    data_bench.py   python -m fmbpo_jax.data.bench   window-sampling speed
    env_bench.py    python -m fmbpo_jax.envs bench   evaluation (environment) throughput

`fmbpo_jax/bench.py`, `fmbpo_jax/report.py` and `fmbpo_jax/data/bench.py` only keep those command lines.
"""
