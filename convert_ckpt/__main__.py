"""`python -m convert_ckpt ...`: see convert_ckpt/cli.py."""
import sys

from convert_ckpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
