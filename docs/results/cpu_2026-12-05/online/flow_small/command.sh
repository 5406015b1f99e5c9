cd .

python -m fmbpo_jax.main --config=configs/online.py:flow_small --workdir=runs/online_cpu_flow \
  --config.tasks=pendulum-spin,cartpole-swingup --config.seeds=1 \
  --config.online.env_steps=5000 --config.online.seed_steps=1000 --config.online.utd=0.5 --config.online.update_every=10 \
  --config.eval.freq=1000 --config.checkpoint_freq=1000 --config.diagnostics.freq=2500 --config.task_chunk=1
