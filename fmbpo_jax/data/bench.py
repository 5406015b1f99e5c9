"""``python -m fmbpo_jax.data.bench``: the window-sampling benchmark. The code lives in ``fmbpo_jax/tools/data_bench.py``."""
from fmbpo_jax.tools.data_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
