"""Runs `train.train_and_evaluate` on the tiny config in a subprocess, for tests.

  python tests/train_helper.py --workdir W --data_dir D --steps 4 \
      [--checkpoint_every 2] [--kill_after_step 2] [--record batches.txt]
      [--coordinator 127.0.0.1:PORT --num_processes 2 --process_id 0]
      [--set key=python_literal ...]

--record appends one line per training batch this process feeds (a digest of
its images, landmarks and dataset ids), so tests can compare data order.
--kill_after_step makes the process SIGKILL itself once the checkpoint of
that step is committed: an abrupt death, not a clean exit.
--coordinator starts jax.distributed (CPU collectives over gloo) first.
The final metrics are printed as one JSON line prefixed with "FINAL ".
"""

import argparse
import ast
import faulthandler
import hashlib
import json
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))


def _parse():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--kill_after_step", type=int, default=0)
  parser.add_argument("--record", default="")
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--set", action="append", default=[])
  return parser.parse_args()


def main():
  args = _parse()
  # `kill -USR1 <pid>` prints every thread's stack: for diagnosing a hang.
  faulthandler.register(signal.SIGUSR1)
  from absl import flags
  from absl import logging
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.INFO)
  import jax
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
  from configs import tiny
  from fgtbt_jax import checkpointing
  from fgtbt_jax import train

  config = tiny.get_config()
  config.data.data_dir = args.data_dir
  config.synthetic_data.generate = False
  config.train.steps = args.steps
  config.train.checkpoint_every = args.checkpoint_every
  config.train.eval_every = 10 * args.steps
  for item in args.set:
    key, value = item.split("=", 1)
    config.update_from_flattened_dict({key: ast.literal_eval(value)})

  if args.record:
    from fgtbt_jax import sharding
    to_global = sharding.global_batch

    def recording_global_batch(local_batch, batch_sharding, keys):
      if "dataset_id" in keys:  # A training batch (eval batches carry images only).
        digest = hashlib.sha1()
        for key in ("image", "landmarks", "dataset_id"):
          digest.update(local_batch[key].tobytes())
        with open(args.record, "a") as f:
          f.write(digest.hexdigest() + "\n")
      return to_global(local_batch, batch_sharding, keys)

    sharding.global_batch = recording_global_batch

  if args.kill_after_step:
    save = checkpointing.Checkpointer.save

    def save_then_die(self, step, state, data_iterator, force=False):
      started = save(self, step, state, data_iterator, force)
      if step == args.kill_after_step:
        self.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
      return started

    checkpointing.Checkpointer.save = save_then_die

  result = train.train_and_evaluate(config, args.workdir)
  print("FINAL " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
