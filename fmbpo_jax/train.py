"""Compatibility entry: the trainer lives in fmbpo_jax.training (see its package docstring for the map).

`from fmbpo_jax.train import train` and the names below keep working for scripts written against the old module.
"""
from fmbpo_jax.training.lifecycle import EXIT_REQUEUE, OutOfDeviceMemory, Preempted, TrainingStopped
from fmbpo_jax.training.memory import choose_task_chunk, device_memory_stats, program_bytes
from fmbpo_jax.training.program import init_runs, make_policy_fn, make_train_chunk, make_train_chunk_host, run_keys
from fmbpo_jax.training.runlog import format_table, read_jsonl
from fmbpo_jax.training.trainer import train

__all__ = ["train", "EXIT_REQUEUE", "Preempted", "TrainingStopped", "OutOfDeviceMemory", "init_runs", "run_keys",
           "make_train_chunk", "make_train_chunk_host", "make_policy_fn", "program_bytes", "device_memory_stats",
           "choose_task_chunk", "read_jsonl", "format_table"]
