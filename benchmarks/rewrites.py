"""The exact rewrites side by side: the train step before and after, in one run.

    python -m benchmarks.rewrites [--variants=small:128,paper:128] [--batch=8] \\
        [--rounds=5] [--dtype=float32] [--forms=before,decoder,depthwise,after]

For each model variant and input size it compiles the real train step
(`train.make_train_step`, random weights, one synthetic batch on device) in
four forms of the same network:

* before:    `decoder_fusion="concat"`, `depthwise_impl="conv"` (the forms
             before the rewrites);
* decoder:   the composed head fusion alone;
* depthwise: the Mix-FFN depthwise convolution as nine shifted multiply-adds alone;
* after:     both (the defaults on CPU);

all four keeping every forward value for the backward pass (remat_policy
"none"); `--forms=after,after_dots,after_dots_no_batch,after_segments` instead compares the
train step's rematerialisation policies (`models.remat`) on the "after" form,
and `--forms=after,after_dot1x1` the "after" form with its 1x1 convolutions
computed as matmuls (`pointwise_impl="dot"`, not a default).

It then times them interleaved (each round runs every form once, so a load
change on a shared machine hits all of them alike) and prints one JSON line
per variant with the median step seconds of each form, the ratios to
"before", the model's multiply-adds per image of both head forms
(`cost.count_macs`) and XLA's memory estimate of each compiled step. Not a
test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import statistics
import sys
import time

from absl import app
from absl import flags
import jax

from benchmarks import common
from configs import default
from fgtbt_jax import aot
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import state as state_lib
from fgtbt_jax import train
from fgtbt_jax.models import cost

def _form(fusion: str, depthwise: str, pointwise: str, remat_policy: str = "none") -> dict:
  return {"decoder_fusion": fusion, "depthwise_impl": depthwise, "pointwise_impl": pointwise,
          "remat_policy": remat_policy}


FORMS = {
    "before": _form("concat", "conv", "conv"),
    "decoder": _form("composed", "conv", "conv"),
    "depthwise": _form("concat", "shifts", "conv"),
    "after": _form("composed", "shifts", "conv"),
    # "after" with the 1x1 convolutions as matmuls over channels.
    "after_dot1x1": _form("composed", "shifts", "dot"),
    # The same network under the train step's rematerialisation policies
    # (models.remat): the cost of recomputing instead of keeping.
    "after_dots": _form("composed", "shifts", "conv", "dots"),
    "after_dots_no_batch": _form("composed", "shifts", "conv", "dots_no_batch"),
    "after_segments": _form("composed", "shifts", "conv", "segments"),
}
REWRITE_FORMS = ("before", "decoder", "depthwise", "after")

_VARIANTS = flags.DEFINE_list("variants", ["small:128", "paper:128"],
                              "variant:input_size pairs to measure")
_BATCH = flags.DEFINE_integer("batch", 8, "global batch (a multiple of the 4 datasets)")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "timed rounds (each runs every form once)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_FORMS = flags.DEFINE_list("forms", list(REWRITE_FORMS),
                           f"forms to compare, the first one the baseline; of {tuple(FORMS)}")


def form_config(variant: str, size: int, batch: int, dtype: str, form: dict):
  """The default config with the model variant in one of the `FORMS`, synthetic batches."""
  config = default.get_config()
  config.model = models.model_config(variant, input_size=size, dtype=dtype, **form)
  config.data.image_size = size
  config.data.samples_per_dataset = batch // len(config.data.datasets)
  config.data.data_dir = "(none: synthetic batches on device)"
  return config


def compiled_form_step(variant: str, size: int, batch: int, dtype: str, form: dict):
  """The real train step of one form, compiled, with a random state and a synthetic batch.

  Returns (lowered, compiled, state, data, compile_s): `lowered` compiles
  again with other XLA options; the step donates `state`.
  """
  config = form_config(variant, size, batch, dtype, form)
  setup = state_lib.build_setup(config)
  state = common.random_train_state(setup, 0)
  data = common.synthetic_train_batch(config, sharding.batch_sharding(setup.mesh), 0)
  step = train.make_train_step(setup, state_lib.ema_decay_per_step(config))
  start = time.perf_counter()
  with sharding.mesh_and_rules(setup.mesh, setup.rules):
    lowered = aot.jitted_function(step).lower(state, data)
    compiled = lowered.compile()
  return lowered, compiled, state, data, time.perf_counter() - start


def compare(variant: str, size: int, batch: int = 8, rounds: int = 5,
            dtype: str = "float32", forms=REWRITE_FORMS) -> dict:
  """The record of one variant: compile and time `forms` (see the module doc), the first the baseline."""
  forms = tuple(forms)
  if len(forms) < 2 or set(forms) - set(FORMS):
    raise ValueError(f"--forms: two or more of {tuple(FORMS)}, the first the baseline; got {forms}")
  steps, record = {}, {"benchmark": "rewrites", "variant": variant, "input_size": size,
                       "batch": batch, "dtype": dtype, "rounds": rounds,
                       "devices": jax.device_count()}
  for name in forms:
    _, compiled, state, data, compile_s = compiled_form_step(variant, size, batch, dtype,
                                                             FORMS[name])
    record[f"{name}_compile_s"] = round(compile_s, 1)
    record[f"{name}_xla_memory_bytes"] = common.compiled_memory_bytes(compiled)
    holder = {"state": state}

    def run(compiled=compiled, holder=holder, data=data):
      holder["state"], metrics = compiled(holder["state"], data)
      return metrics["loss"]

    common.time_calls(run, 1)  # Warm-up.
    steps[name] = run
  seconds = {name: [] for name in forms}
  for _ in range(rounds):
    for name, run in steps.items():
      seconds[name].extend(common.time_calls(run, 1))
  for name in forms:
    record[f"{name}_step_s"] = round(statistics.median(seconds[name]), 4)
  record["baseline"] = forms[0]
  for name in forms[1:]:
    record[f"{name}_speedup"] = round(record[f"{forms[0]}_step_s"] / record[f"{name}_step_s"], 2)
  for fusion in ("concat", "composed"):
    record[f"macs_per_image_{fusion}"] = cost.count_macs(
        models.model_config(variant, input_size=size, decoder_fusion=fusion))["layers"]
  return record


def main(argv: list[str]) -> int:
  del argv
  common.emit(common.machine_record())
  for entry in _VARIANTS.value:
    variant, _, size = entry.partition(":")
    common.emit(compare(variant, int(size or 0) or models.model_config(variant).input_size,
                        _BATCH.value, _ROUNDS.value, _DTYPE.value, _FORMS.value))
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
