"""Low-resolution faces (SHT): the rows of docs/model.md's table, trained and evaluated alike.

    python -m benchmarks.lowres_study [--rows fgtbt,lowres,dhln] [--root runs/lowres_study] \\
        [--steps 1200] [-- extra --config.* overrides for every row]

Each row is a `configs/ablations.py` study on the embedded synthetic data
(`base=default`: the tiny FGTBT at 64 px, the default run's steps, seed and
schedule), trained with `run.py train` into <root>/<row> and evaluated with
`run.py eval` and the `lowres` study (faces downsampled to a 16 / 32 / 64 /
128 px face box side, `eval.lowres_sides`):

  fgtbt    the FGTBT network, trained on the crops as they are
  lowres   + low-resolution training (`lowres.factors` 2 / 4 / 8)
  dhln     + SHT's dual hallucination stream (`model.hallucination`)
  sht      + SHT's pose transfer between two views of each face (`sht.enabled`);
           with `-- --config.data.labeled_fraction=0.25` the other faces'
           landmarks are dropped, so they train through the transfer only
  small    the FGTBT network on the crop halved (`model.input_downsample` 2:
           SHT-M's small input, a 32 px network)
  small_dhln  + DHLN hallucinating the 64 px crop from the halved one (SHT-M);
           with `-- --config.lowres.factors=()` the halving is the only
           low-resolution input

A row whose run already finished (its final_metrics.json) is not trained
again. Prints one JSON line per row: the NME (%) per face side and dataset,
their mean over the datasets, and the PSNR / SSIM of the degraded inputs
and (DHLN) of the hallucinated faces at each side; then the markdown table.
Not a test: a run takes ~10-20 min on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROWS = {"fgtbt": "base=default", "lowres": "base=default,lowres=on",
        "dhln": "base=default,dhln=on", "sht": "base=default,sht=on",
        "small": "base=default,input_downsample=2",
        "small_dhln": "base=default,dhln=on,input_downsample=2"}
REPO = pathlib.Path(__file__).resolve().parent.parent


def run_row(row: str, root: pathlib.Path, steps: int | None, extra: list[str]) -> dict:
  """Trains (unless done) and evaluates one row; its lowres tables from report.json."""
  workdir = root / row
  config = [f"--config={REPO / 'configs' / 'ablations.py'}:{ROWS[row]}"]
  if steps is not None:
    config.append(f"--config.train.steps={steps}")
  config += extra
  if not (workdir / "final_metrics.json").is_file():
    subprocess.run([sys.executable, str(REPO / "run.py"), "train", f"--workdir={workdir}",
                    *config], check=True)
  subprocess.run([sys.executable, str(REPO / "run.py"), "eval", f"--workdir={workdir}",
                  "--config.eval.studies=('lowres',)", *extra], check=True)
  report = json.loads((workdir / "report" / "report.json").read_text())
  nme = report["studies"]["lowres"]
  return {"row": row, "study": ROWS[row],
          "nme": {side: {d: 100 * v for d, v in by.items()} for side, by in nme.items()},
          "mean_nme": {side: 100 * sum(by.values()) / len(by) for side, by in nme.items()},
          "faces": report["studies"].get("lowres_faces", {})}


def markdown(records: list[dict]) -> str:
  sides = list(records[0]["mean_nme"])
  lines = ["| row | " + " | ".join(f"NME {s} px" for s in sides)
           + " | " + " | ".join(f"PSNR / SSIM {s} px" for s in sides) + " |",
           "|---|" + "---|" * (2 * len(sides))]
  for r in records:
    faces = r["faces"]

    def quality(side):
      row = faces.get(side, {})
      psnr, ssim = row.get("psnr", row.get("input_psnr")), row.get("ssim", row.get("input_ssim"))
      return "same" if psnr is None else f"{psnr:.2f} / {ssim:.4f}"

    lines.append(f"| {r['row']} | " + " | ".join(f"{r['mean_nme'][s]:.2f}" for s in sides)
                 + " | " + " | ".join(quality(s) for s in sides) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--root", default=str(REPO / "runs" / "lowres_study"))
  parser.add_argument("--steps", type=int, default=None)
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  rows = [r for r in args.rows.split(",") if r]
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; expected names from {tuple(ROWS)}")
  root = pathlib.Path(args.root)
  records = []
  for row in rows:
    records.append(run_row(row, root, args.steps, extra))
    print(json.dumps(records[-1]), flush=True)
  print(markdown(records))


if __name__ == "__main__":
  main()
