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
import os
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

  def discard_after(self, step: int) -> None:
    """Drops the JSON-lines rows of steps after `step` (a run resumed from it).

    Each file is rewritten atomically (a temporary file, then a rename); a
    line that is not a JSON row is kept as it is.
    """
    if not self.enabled:
      return
    for path in sorted(self.workdir.glob("*_metrics.jsonl")):
      lines = path.read_text().splitlines(keepends=True)
      kept = [line for line in lines if not _row_after(line, step)]
      if len(kept) == len(lines):
        continue
      temporary = path.with_name(f".{path.name}.tmp")
      temporary.write_text("".join(kept))
      os.replace(temporary, path)

  def flush(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def _row_after(line: str, step: int) -> bool:
  try:
    row = json.loads(line)
  except ValueError:
    return False
  return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step
