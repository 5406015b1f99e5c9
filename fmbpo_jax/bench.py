"""``python -m fmbpo_jax.bench``: the training-speed benchmark. The code lives in ``fmbpo_jax/tools/bench/``."""
from fmbpo_jax.tools.bench.cli import main, parse_args, row_plan, run

__all__ = ["main", "parse_args", "row_plan"]

if __name__ == "__main__":
    run()
