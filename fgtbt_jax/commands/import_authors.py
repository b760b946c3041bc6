"""Import the FGTBT authors' released PyTorch checkpoint into a run directory.

    fgtbt import-authors --authors-checkpoint full_model_epoch0_best_wflw.pth \\
        --workdir runs/authors_wflw [--dataset WFLW] [--variant paper]

The command over `fgtbt_jax.weights.import_authors` (what the workdir holds
is in its docstring).
"""

from __future__ import annotations

import argparse
import sys

from configs import fgtbt_authors
from fgtbt_jax import models
from fgtbt_jax.weights import import_authors
from fgtbt_jax.weights.authors import AuthorsCheckpointError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="fgtbt import-authors",
      description="Import the FGTBT authors' released checkpoint into a workdir that "
                  "`run.py eval --checkpoint=best` and `run.py predict` read.")
  parser.add_argument("--authors-checkpoint", required=True,
                      help="the released .pth file, e.g. full_model_epoch0_best_wflw.pth, or a "
                           "bare torch.save(state_dict) of the same network (keys may carry "
                           "DataParallel's 'module.' prefix)")
  parser.add_argument("--workdir", required=True, help="a new run directory to write")
  parser.add_argument("--dataset", default=None,
                      help="whose best model it is (default: the file name's _best_<dataset>)")
  parser.add_argument("--variant", default="paper", choices=models.VARIANTS,
                      help="model variant of the state dict (the released files: paper)")
  args = parser.parse_args(argv)
  try:
    result = import_authors.import_authors_checkpoint(args.authors_checkpoint, args.workdir, args.dataset,
                                                      recipe=fgtbt_authors.get_config(),
                                                      variant=args.variant)
  except AuthorsCheckpointError as e:
    if e.report is not None and not e.report.hint:  # With a hint, the one line says it.
      print(e.report.summary())
    print(f"fgtbt import-authors: {e}", file=sys.stderr)
    return 1
  except (FileNotFoundError, FileExistsError, IsADirectoryError, ValueError) as e:
    print(f"fgtbt import-authors: {e}", file=sys.stderr)
    return 1
  print(result.report.summary())
  print(f"wrote {result.workdir}: the {result.dataset} best model (step {result.step}); "
        f"python run.py eval --workdir {result.workdir} --checkpoint=best "
        "--config.data.data_dir=DATA")
  return 0


if __name__ == "__main__":
  sys.exit(main())
