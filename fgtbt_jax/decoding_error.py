"""How much NME heatmap decoding alone costs ("ideal heatmap" analysis, HIH).

A perfect network would output exactly its training targets. Rendering those
targets for known landmarks, decoding them and mapping the result back to
input pixels measures the error that the heatmap resolution and the decoder
add on their own, independent of any training. HIH (Heatmap In Heatmap)
reports this for integer argmax decoding and its decimal heatmaps (its
Table 8 "ideal" column); here it is measured for every decoder in
`heatmaps.DECODERS` and for the HIH decoders (`heatmaps.HIH_DECODERS`, on
perfect integer and d x d decimal maps, for any d), on mean-face landmarks
placed at random in the input.

Run `fgtbt decoding-error` for the Markdown table in
docs/quantization.md.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import heatmaps
from fgtbt_jax import landmarks
from fgtbt_jax import metrics

# Face width (x extent of the mean face) as a share of the input size, and the
# largest in-plane rotation, for `random_meanface_landmarks`.
FACE_WIDTH_RANGE = (0.55, 0.8)
MAX_ROTATION_DEGREES = 10.0


def random_meanface_landmarks(num_faces: int, input_size: int, seed: int,
                              protocol: str = "WFLW") -> np.ndarray:
  """(num_faces, N, 2) float32 mean faces placed at random in a square input.

  Each face is `landmarks.mean_face()` scaled to a width of 0.55-0.8 of the
  input, rotated by up to +-10 degrees about its centre and shifted to a
  random position that keeps every point inside [0, input_size - 1]. The
  points are returned in the protocol's own order, in input pixels, so the
  sub-pixel phase of every landmark is effectively random.
  """
  p = landmarks.get_protocol(protocol)
  if num_faces < 1:
    raise ValueError(f"num_faces must be >= 1, got {num_faces}")
  rng = np.random.default_rng(seed)
  face = landmarks.mean_face().astype(np.float64)
  face = face - (face.min(0) + face.max(0)) / 2  # Centre the bounding box.
  face_width = np.ptp(face[:, 0])
  scale = rng.uniform(*FACE_WIDTH_RANGE, num_faces) * input_size / face_width
  angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES, num_faces))
  cos, sin = np.cos(angle), np.sin(angle)
  rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (M, 2, 2)
  placed = scale[:, None, None] * np.einsum("mij,nj->mni", rotation, face)
  low, high = placed.min(1), placed.max(1)  # (M, 2) extents around the centre.
  shift = rng.uniform(-low, (input_size - 1) - high)
  return (placed + shift[:, None, :])[:, p.unified_index].astype(np.float32)


@functools.partial(jax.jit, static_argnames=("height", "width", "methods", "rounded",
                                             "decimal_size"))
def _render_and_decode(points, sigma, decimal_sigma, height: int, width: int,
                       methods: tuple[str, ...], rounded: bool, decimal_size: int):
  mask = jnp.ones(points.shape[:-1], bool)
  outputs = {"heatmaps": heatmaps.render_gaussian(points, mask, height, width, sigma,
                                                  rounded=rounded)}
  if any(m in heatmaps.HIH_DECODERS for m in methods):
    outputs["decimal"] = heatmaps.render_decimal_targets(points, mask, decimal_size,
                                                         decimal_sigma, rounded=rounded)
  return {m: heatmaps.decode_outputs(outputs, m)[0] for m in methods}


def decoding_error(input_size: int, heatmap_size: int, sigma: float, landmarks_in_input_px,
                   protocol: str = "WFLW", normalizer: str | None = None, box_size=None,
                   methods: Sequence[str] = heatmaps.DECODERS, rounded_targets: bool = False,
                   chunk_size: int = 16, decimal_size: int = 8,
                   decimal_sigma: float = 1.0) -> dict[str, float]:
  """Mean NME (fraction) that decoding perfect target heatmaps costs.

  Args:
    input_size: side of the square network input, in pixels.
    heatmap_size: side of the square heatmap; stride = input / heatmap.
    sigma: target Gaussian sigma in heatmap pixels.
    landmarks_in_input_px: (M, N, 2) landmarks of M faces in input pixels,
      in the protocol's own order, all inside the input.
    protocol, normalizer, box_size: the NME definition (see `metrics.nme`).
    methods: decoders to measure, names from `heatmaps.ALL_DECODERS`.
    rounded_targets: render targets centred on the nearest heatmap pixel (the
      authors' targets) instead of the exact sub-pixel position; the HIH
      decimal targets on the nearest decimal cell (HIH paper eq. 2).
    chunk_size: faces rendered at once (bounds memory: chunk * H * W * N).
    decimal_size, decimal_sigma: d and the Gaussian sigma (decimal cells) of
      the perfect decimal maps the HIH decoders read.

  Returns:
    {method: mean NME over the M faces}.
  """
  points = np.asarray(landmarks_in_input_px, np.float32)
  p = landmarks.get_protocol(protocol)
  if points.ndim != 3 or points.shape[1:] != (p.num_landmarks, 2):
    raise ValueError(
        f"landmarks_in_input_px: expected shape (M, {p.num_landmarks}, 2) for "
        f"{p.name}, got {points.shape}")
  outside = ~((points >= 0) & (points <= input_size - 1)).all(-1)
  if outside.any():
    face, point = np.argwhere(outside)[0]
    raise ValueError(
        f"landmark {point} of face {face} is {points[face, point]}, outside the "
        f"{input_size}x{input_size} input")
  methods = tuple(methods)
  unknown = [m for m in methods if m not in heatmaps.ALL_DECODERS]
  if unknown:
    raise ValueError(
        f"unknown decoders {unknown}; expected names from {list(heatmaps.ALL_DECODERS)}")
  stride = input_size / heatmap_size
  targets = heatmaps.input_to_heatmap(points, stride)
  decoded = {m: [] for m in methods}
  for start in range(0, len(points), chunk_size):
    coords = _render_and_decode(
        jnp.asarray(targets[start:start + chunk_size]), float(sigma), float(decimal_sigma),
        height=heatmap_size, width=heatmap_size, methods=methods, rounded=rounded_targets,
        decimal_size=int(decimal_size))
    for m in methods:
      decoded[m].append(np.asarray(coords[m]))
  return {m: float(metrics.nme(heatmaps.heatmap_to_input(np.concatenate(decoded[m]), stride),
                               points, p, normalizer, box_size).mean())
          for m in methods}


def markdown_table(rows: Sequence[tuple[tuple[int, int, float], bool, dict[str, float]]],
                   methods: Sequence[str], protocol: str, normalizer: str) -> str:
  """Markdown table of NME (%) per setting, target form and decoder."""
  header = ("| input | heatmap | sigma | targets | "
            + " | ".join(f"{m} NME %" for m in methods) + " |")
  lines = [f"{protocol} {normalizer} NME (%) of decoding ideal heatmaps", "",
           header, "|" + "---|" * (4 + len(methods))]
  for (input_size, heatmap_size, sigma), rounded, result in rows:
    cells = " | ".join(f"{100 * result[m]:.4f}" for m in methods)
    target = "rounded" if rounded else "exact"
    size = f"{heatmap_size}x{heatmap_size}"
    lines.append(f"| {input_size} | {size} | {sigma:g} | {target} | {cells} |")
  return "\n".join(lines)


if __name__ == "__main__":  # The command moved; say where instead of doing nothing.
  raise SystemExit("this module is a library now; the command is `fgtbt decoding-error` "
                   "(or `python -m fgtbt_jax.commands decoding-error`)")
