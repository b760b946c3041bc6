"""`python -m fgtbt_jax.commands <command> [flags]`: the `fgtbt` command without installing."""

import sys

from fgtbt_jax.commands import main

sys.exit(main())
