"""The policy trainer, one concern per module (the jitted algorithm itself is fmbpo_jax.pwm):

    trainer.py     Trainer / train(): the loop, its steps as methods (setup, train_chunk, save, final evaluation)
    program.py     the jittable program: per-run state init, the chunk of epochs (device- or host-fed), the
                   evaluation policy, diagnostics, best-params selection
    feed.py        the data store for the plan's tasks and how batches reach the program (DeviceFeed / HostFeed)
    evaluation.py  periodic evaluation in a thread, the best params it keeps, final plain + planning evaluations
    lifecycle.py   the loop skeleton, checkpoints, SIGTERM -> Preempted (exit 75), errors, out-of-memory advice
                   (shared with WM pretraining, fmbpo_jax/pretrain.py)
    memory.py      program and device memory, --config.task_chunk=-1's choice
    runlog.py      metrics/eval/diagnostics JSONL logs, results.csv and summary.md tables

A run's settings come from one run_config.RunPlan; the run axis (padding, sharding, several processes) is
sharding.RunAxis.
"""
