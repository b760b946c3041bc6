"""`python -m data_pipelines.visualize`: the `fgtbt visualize` command (fgtbt_jax/commands/visualize.py)."""

import sys

from fgtbt_jax.commands.visualize import main

if __name__ == "__main__":
  sys.exit(main())
