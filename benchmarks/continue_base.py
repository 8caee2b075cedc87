"""Continue pre-training a base checkpoint (e.g. a shipped asset) in a new workdir.

    python benchmarks/continue_base.py --from=embedded:world_base_16_v2 --workdir=W \
        --set=model.text_encoder.freeze=True '--set=model.cross_attention_resolutions=(16,8,4)' \
        --set=pretrain.num_steps=16000
    python -m suti.launch --config=configs/world_base.py --workdir=W \
        --config.model.text_encoder.freeze=True \
        '--config.model.cross_attention_resolutions=(16,8,4)' --config.pretrain.num_steps=16000

A shipped base keeps its params, not its optimizer state. This writes
W/pretrain/checkpoints/STEP (STEP: the base's own step) with the base's params, a fresh
optimizer state for the run's config and a fresh data iterator, and W/data, so that the
launch with the same overrides resumes from STEP to pretrain.num_steps (its cosine rate
computed over the new length: at STEP it is where that longer run would be).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pretrain import load_config  # pylint: disable=wrong-import-position
from suti import checkpoint as checkpoint_lib  # pylint: disable=wrong-import-position
from suti import config_lib, pretrain  # pylint: disable=wrong-import-position
from suti.data import stage as data_stage  # pylint: disable=wrong-import-position


def seed_workdir(config, source: str, workdir) -> int:
  """Writes `workdir`'s data and its pretrain checkpoint at the source base's step; returns it."""
  workdir = pathlib.Path(workdir)
  directory = pretrain.resolve_base_checkpoint(source)
  with checkpoint_lib.Checkpoints(directory, read_only=True) as ckpt:
    step = ckpt.latest_step()
  if step is None:
    raise SystemExit(f"--from={source}: no checkpoint steps in {directory}")
  target = pretrain.stage_dir(workdir) / "checkpoints"
  if target.exists():
    raise SystemExit(f"--workdir={workdir}: {target} exists; give a new workdir")
  base_config = config_lib.validate(config.copy_and_resolve_references())
  base_config.pretrain.base_checkpoint = source
  model, trainable, _ = pretrain.load_base(base_config, workdir)  # refuses another model
  data_stage.run(config, workdir)
  data = pretrain.data_iterator(config, model, workdir)
  opt_state = pretrain.make_optimizer(config.pretrain).init(trainable)  # fresh: the base has none
  with checkpoint_lib.Checkpoints.from_config(target, config) as ckpt:
    ckpt.save(step, params=trainable, opt_state=opt_state, config=config,
              data_state=data.get_state(), meta={"stage": "pretrain"})
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/world_base.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--from", dest="source", required=True,
                      help="a base checkpoint directory or embedded:NAME")
  parser.add_argument("--workdir", required=True, help="a new workdir")
  args = parser.parse_args()
  config = config_lib.validate(load_config(args.config, args.set))
  config.pretrain.base_checkpoint = ""
  step = seed_workdir(config, args.source, args.workdir)
  print(f"{args.workdir}: pretrain resumes from step {step} to {config.pretrain.num_steps}")


if __name__ == "__main__":
  main()
