"""The run's metric writer: TensorBoard scalars and JSON lines, on process 0 only.

    writer = MetricWriter(workdir)
    writer.write("train", step, {"loss": 0.3})   # train/loss + train_metrics.jsonl
    writer.write("eval", step, flat_results)     # eval/...   + eval_metrics.jsonl
    writer.close()

Other processes get a writer that writes nothing, so callers need no
process checks.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping

import jax
import tensorboardX


class MetricWriter:
  """Writes `<prefix>/<key>` TensorBoard scalars and `<prefix>_metrics.jsonl` lines.

  Args:
    workdir: the run's directory (tensorboard/ and the .jsonl files go there).
    enabled: default: this is process 0.
  """

  def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
    self.workdir = pathlib.Path(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self._tensorboard = (tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"))
                         if self.enabled else None)

  def write(self, prefix: str, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` of `step` under `prefix` ("train" or "eval")."""
    if not self.enabled:
      return
    for key, value in scalars.items():
      self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)
    with open(self.workdir / f"{prefix}_metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None
