"""python -m fmbpo_jax.tools.report (the same as python -m fmbpo_jax.report)."""
import sys

from fmbpo_jax.tools.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
