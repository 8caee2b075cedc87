"""The apprentice's ceiling: its buffer with perfect teachers (embedded world only).

    python benchmarks/probe_oracle_targets.py --from=W --to=W_oracle
    python -m suti.launch --config=configs/demo.py --workdir=W_oracle --stages=apprentice,evaluate

Copies workdir W's dataset, scorers and experts' summary to W_oracle and writes a buffer in
which every pseudo-target of W's buffer (admitted and rejected, with its verdict, prompt,
demos and scores unchanged) is replaced by the world oracle's render of its subject for its
prompt. An apprentice trained on it learns from teachers that draw every subject exactly;
compared with W's own apprentice it says whether SuTI is limited by its experts' samples or
by what the apprentice can learn from the buffer at all. Pass the same --config and overrides
to the launch as W was made with, so that evaluate's other rows are comparable.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # pylint: disable=wrong-import-position

from bench_pretrain import load_config  # pylint: disable=wrong-import-position
from experts import buffer as buffer_lib  # pylint: disable=wrong-import-position
from experts import stage as experts_stage  # pylint: disable=wrong-import-position
from suti import config_lib  # pylint: disable=wrong-import-position
from suti.data import world as world_lib  # pylint: disable=wrong-import-position

COPIED = ("data", "clip", "dino", "experts/summary.json")
# Oracle seeds apart from the experts' sample seeds; the render's layout follows the seed.
SEED_OFFSET = 10_000


def subject_by_id(world, subject_id: str):
  """The world's subject of a buffer record's subject_id ('train-00012')."""
  split, _, index = subject_id.rpartition("-")
  try:
    subject = world.subjects(split, 1, start=int(index))[0]
  except ValueError as e:
    subject = None
    reason = str(e)
  else:
    reason = f"its subject there is {subject.subject_id!r}"
  if subject is None or subject.subject_id != subject_id:
    raise ValueError(f"buffer record subject_id {subject_id!r} is not a subject of this world "
                     f"({reason}); pass the --config and --set the workdir was made with")
  return subject


def write_oracle_buffer(world, source: pathlib.Path, target: pathlib.Path) -> int:
  """Every committed round of `source` again in `target`, targets replaced by oracle renders."""
  # Every record, admitted or not (deltas are finite, identity rules set aside), by round.
  by_round = {}
  for record in buffer_lib.BufferSource(source, threshold=-np.inf, identity_rule=False):
    subject = subject_by_id(world, record["subject_id"])
    seed = SEED_OFFSET + 16 * int(record["seed"]) + int(record["sample_index"])
    record["image"] = world.render(subject, record["prompt"], seed)[0]
    by_round.setdefault(int(record["round"]), []).append(record)
  writer = buffer_lib.BufferWriter(target)
  for entry in buffer_lib.read_manifest(source)["rounds"]:
    writer.commit_round(entry["round"], by_round.get(entry["round"], []), info=entry["info"],
                        subject_ids=entry["subject_ids"])
  return sum(len(records) for records in by_round.values())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--from", dest="source", required=True, help="a workdir with a buffer")
  parser.add_argument("--to", dest="target", required=True, help="a new workdir")
  args = parser.parse_args()

  config = config_lib.validate(load_config(args.config, args.set))
  source, target = pathlib.Path(args.source), pathlib.Path(args.target)
  buffer_dir = experts_stage.buffer_dir(source)
  if not (buffer_dir / buffer_lib.MANIFEST).exists():
    raise SystemExit(f"--from={source}: no experts buffer ({buffer_dir / buffer_lib.MANIFEST})")
  if target.exists():
    raise SystemExit(f"--to={target} exists; give a new directory")
  for name in COPIED:
    if (source / name).is_dir():
      shutil.copytree(source / name, target / name)
    elif (source / name).exists():
      (target / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source / name, target / name)
  count = write_oracle_buffer(world_lib.from_config(config), buffer_dir,
                              experts_stage.buffer_dir(target))
  print(f"{count} records with oracle targets in {experts_stage.buffer_dir(target)}")


if __name__ == "__main__":
  main()
