"""``python -m fmbpo_jax.report``: the results report of trained runs. The code lives in ``fmbpo_jax/tools/report/``."""
import sys

from fmbpo_jax.tools.report.cli import build_report, main

__all__ = ["build_report", "main"]

if __name__ == "__main__":
    sys.exit(main())
