"""`python -m data_pipelines.convert`: the `fgtbt convert` command (fgtbt_jax/commands/convert.py)."""

import sys

from fgtbt_jax.commands.convert import main

if __name__ == "__main__":
  sys.exit(main())
