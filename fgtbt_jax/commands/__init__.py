"""The command line: `fgtbt <command> [flags]` (after `pip install .`).

    fgtbt train   [--config=FILE] [--workdir=DIR] [--config.x=y ...]   = python run.py
    fgtbt eval    --workdir=DIR [--checkpoint=best]                    = python run.py eval
    fgtbt predict --workdir=DIR --image=PATH                           = python run.py predict
    fgtbt convert --dataset wflw --src DIR --out DIR                   converted benchmark data
    fgtbt synthetic --out DIR                                          synthetic datasets
    fgtbt visualize --data-dir DIR --out grid.png                      augmented samples
    fgtbt export --workdir DIR --out FILE                              a StableHLO artifact
    fgtbt import-authors --authors-checkpoint FILE --workdir DIR       the authors' weights
    fgtbt import-imagenet --input FILE --output FILE                   ImageNet MiT weights
    fgtbt calibrate-detector --faces FILE                              a detector's box fit
    fgtbt aot --config=FILE --topology=v5e:2x2                         compile for a TPU
    fgtbt decoding-error                                               heatmap decoding error

`fgtbt <command> --help` lists a command's flags. Without installing, the
same is `python -m fgtbt_jax.commands <command> ...` (and `python run.py`
for train, eval and predict; `python -m data_pipelines.convert` and its
siblings for the data commands).

Every command line of the project lives in this package: the library modules
below it define functions, never an argument parser. Each module here has a
`main(argv) -> exit status` (run.py's modes: `run.launch`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# command -> (module of this package, one line for `fgtbt --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("run", "train and evaluate a config (python run.py)"),
    "eval": ("run", "evaluate a run's checkpoint on the test splits"),
    "predict": ("run", "landmarks of images, folders or videos"),
    "convert": ("convert", "convert a benchmark dataset to ArrayRecord crops"),
    "synthetic": ("synthetic", "render synthetic datasets in the real file formats"),
    "visualize": ("visualize", "a PNG grid of augmented training samples"),
    "export": ("export", "a run's predict function as a StableHLO artifact"),
    "import-authors": ("import_authors", "the authors' released .pth into a workdir"),
    "import-imagenet": ("import_imagenet", "ImageNet MiT/SegFormer weights to Flax params"),
    "calibrate-detector": ("calibrate_detector", "fit a face detector's box adjustment"),
    "aot": ("aot", "compile the train step for a TPU topology or cpu:N"),
    "decoding-error": ("decoding_error", "the error of heatmap decoding alone"),
}


def usage() -> str:
  """The command list of `fgtbt --help`."""
  width = max(map(len, COMMANDS))
  return "\n".join(["usage: fgtbt <command> [flags]   (fgtbt <command> --help: its flags)",
                    "", "commands:"] +
                   [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()])


def main(argv: Sequence[str] | None = None) -> int:
  """`fgtbt <command> [flags]`: runs the command; its exit status."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return 0 if len(argv) >= 2 else 2
  name, rest = argv[1], argv[2:]
  if name not in COMMANDS:
    print(f"fgtbt: unknown command {name!r}\n{usage()}", file=sys.stderr)
    return 2
  if COMMANDS[name][0] == "run":
    # absl and config_flags read the full command line ([program, mode, flags...])
    # from sys.argv, from the moment the module defines its flags.
    sys.argv = ["fgtbt", name, *rest]
    importlib.import_module(f"{__name__}.run").launch(sys.argv)
    return 0
  return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}").main(rest)
