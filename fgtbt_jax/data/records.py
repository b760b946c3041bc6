"""The record every reader yields and every converter consumes.

One `FaceRecord` is one annotated face. Coordinates are 0-based pixel
positions with integer values at pixel centres (x right, y down), in the
original image; readers convert from each format's own convention (300W
`.pts` files are 1-based).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Union

import numpy as np

# Where the pixels come from: a path to an image file, already encoded bytes
# (JPEG/PNG), or a decoded HxW or HxWxC uint8 array (COFW stores images in
# its .mat files).
ImageSource = Union[str, bytes, np.ndarray]


@dataclasses.dataclass
class FaceRecord:
  dataset: str                 # protocol name: "WFLW", "300W", "COFW", "AFLW"
  split: str                   # "train" or "test"
  image: ImageSource
  landmarks: np.ndarray        # (N, 2) float32, the dataset's own point order
  box: np.ndarray              # (4,) float32 face box x1, y1, x2, y2
  source: str                  # "file:line" or "file[index]" for messages
  image_name: str = ""         # the name the annotation gives the image
  # HRNet crop convention: centre of the box and scale = max(w, h) / 200
  # (the loader enlarges it by 1.25). Filled from the box when a format has
  # no centre/scale columns of its own.
  center: np.ndarray | None = None
  scale: float | None = None
  box_size: float | None = None  # NME normaliser given by the format (AFLW)
  # Per-point flags: COFW occlusion (1 = occluded), AFLW visibility (1 = visible).
  point_flags: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  # Subset tags, e.g. WFLW attributes ("pose", ...), 300W "common" /
  # "challenging", AFLW "frontal".
  subsets: tuple[str, ...] = ()

  def __post_init__(self):
    self.landmarks = np.asarray(self.landmarks, np.float32)
    self.box = np.asarray(self.box, np.float32)
    if self.center is None:
      x1, y1, x2, y2 = self.box
      self.center = np.asarray([(x1 + x2) / 2, (y1 + y2) / 2], np.float32)
    else:
      self.center = np.asarray(self.center, np.float32)
    if self.scale is None:
      x1, y1, x2, y2 = self.box
      self.scale = float(max(x2 - x1, y2 - y1) / 200.0)
