cd .

python -m fmbpo_jax.main --config=configs/online.py:mlp_small --workdir=runs/online_cpu_mlp \
  --config.tasks=pendulum-spin,cartpole-swingup --config.seeds=1,2 \
  --config.online.env_steps=8000 --config.online.seed_steps=1000 --config.online.utd=0.5 --config.online.update_every=10 \
  --config.eval.freq=2000 --config.checkpoint_freq=2000 --config.diagnostics.freq=2000 --config.task_chunk=1
