"""`python -m data_pipelines.synthetic`: the `fgtbt synthetic` command (fgtbt_jax/commands/synthetic.py)."""

import sys

from fgtbt_jax.commands.synthetic import main

if __name__ == "__main__":
  sys.exit(main())
