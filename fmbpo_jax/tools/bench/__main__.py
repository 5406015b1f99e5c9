"""python -m fmbpo_jax.tools.bench (the same as python -m fmbpo_jax.bench)."""
from fmbpo_jax.tools.bench.cli import run

if __name__ == "__main__":
    run()
