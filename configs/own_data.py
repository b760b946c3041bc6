"""Train the small model on your own faces (alone, or jointly with benchmarks).

The recipe (docs/training.md, "Your own data"):

  # 1. Convert once: a folder of images with one annotation each beside it
  #    (face_001.jpg + face_001.pts, or .json / .csv of points), under the
  #    point scheme the annotations follow: a benchmark's (WFLW, 300W, COFW,
  #    AFLW) or a JSON list of unified point names (--list-points).
  python -m data_pipelines.convert --dataset mine --format folder \
      --src ~/faces --scheme 300W --out data/own [--split-ratio 0.9 | --split-list test.txt]
  python -m data_pipelines.visualize --data-dir data/own --datasets mine --out grid.png

  # 2. Train (configs/own_data.py:NAMES: the datasets, comma-separated; own
  #    names and benchmarks converted into the same --out folder).
  python run.py --config=configs/own_data.py:mine --workdir=runs/mine

  # 3. Evaluate the EMA model on the test split, then predict.
  python run.py eval --workdir=runs/mine
  python run.py predict --workdir=runs/mine --image=photo.jpg --config.predict.protocol=mine
  #    (your scheme's points in its order, kept with the run in schemes.json;
  #    or any benchmark's, or unified: the model outputs all 124)

Each own dataset is one task of the batch, masked to its own points like a
benchmark, and evaluated with its normaliser: a benchmark scheme's own
(COFW inter-pupil, AFLW box, ...), else inter-ocular when both outer eye
corners are among its points, else the face box. `data.data_dir`
defaults to data/own in the checkout (`--config.data.data_dir=DIR` for
another `--out`); synthetic generation is off. Model and schedule are the
embedded default's (configs/default.py: the tiny variant at 64 px, 1,200
steps of 2 images per dataset); for a larger model take
`--config.model.variant` and the paper's schedule from configs/fgtbt_paper.py.
"""

import pathlib

import ml_collections

from configs import default

_REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATASETS = "mine"


def get_config(datasets: str = DEFAULT_DATASETS) -> ml_collections.ConfigDict:
  """The default run's model and schedule on `datasets` (comma-separated)."""
  config = default.get_config()
  names = tuple(n.strip() for n in str(datasets or DEFAULT_DATASETS).split(",") if n.strip())
  config.data.datasets = names
  config.data.data_dir = str(_REPO / "data" / "own")
  config.synthetic_data.generate = False
  return config
