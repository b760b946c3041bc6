"""`python -m fgtbt_jax.commands <command> [flags]`: the `fgtbt` command without installing."""

import sys

from fgtbt_jax.commands import main

if __name__ == "__main__":  # Importing the package's modules (a scan of them) runs nothing.
  sys.exit(main())
