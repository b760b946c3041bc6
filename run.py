"""FGTBT: the single entry point (train, eval, predict).

  python run.py                      the embedded default: synthetic data, train, evaluate
  python run.py --config=configs/fgtbt_paper.py --workdir=runs/paper --config.data.data_dir=DATA
  python run.py eval --workdir=runs/paper [--checkpoint=best]
  python run.py predict --workdir=runs/paper --image=PATH

`python run.py --help` lists the flags; the commands are
fgtbt_jax/commands/run.py (also `fgtbt train|eval|predict` after
`pip install .`). Default workdirs are runs/<config name> in this checkout.
"""

import pathlib
import sys

from fgtbt_jax.commands import run

if __name__ == "__main__":
  run.launch(sys.argv, root=pathlib.Path(__file__).resolve().parent)
