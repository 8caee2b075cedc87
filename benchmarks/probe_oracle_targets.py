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

--subjects=N writes instead a buffer of the dataset's first N training clusters, as if N
perfect experts had drawn each of their unseen prompts twice (what more expert subjects could
give at best); with --copy each target is one of the cluster's own images and the demos are
the others (the easiest in-context task: the target's subject looks exactly as in its demos).
"""
from __future__ import annotations

import argparse
import json
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
from suti.data import pipeline  # pylint: disable=wrong-import-position
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


def oracle_seed(record_seed: int, sample_index: int) -> int:
  """The render seed of a record's oracle target (its layout follows the seed)."""
  return SEED_OFFSET + 16 * int(record_seed) + int(sample_index)


def write_oracle_buffer(world, source: pathlib.Path, target: pathlib.Path) -> int:
  """Every committed round of `source` again in `target`, targets replaced by oracle renders."""
  # Every record, admitted or not (deltas are finite, identity rules set aside), by round.
  by_round = {}
  for record in buffer_lib.BufferSource(source, threshold=-np.inf, identity_rule=False):
    subject = subject_by_id(world, record["subject_id"])
    record["image"] = world.render(subject, record["prompt"],
                                   oracle_seed(record["seed"], record["sample_index"]))[0]
    by_round.setdefault(int(record["round"]), []).append(record)
  writer = buffer_lib.BufferWriter(target)
  for entry in buffer_lib.read_manifest(source)["rounds"]:
    writer.commit_round(entry["round"], by_round.get(entry["round"], []), info=entry["info"],
                        subject_ids=entry["subject_ids"])
  return sum(len(records) for records in by_round.values())


def write_cluster_buffer(world, clusters, target: pathlib.Path, copy: bool = False,
                         samples_per_prompt: int = 2) -> int:
  """One round of records for `clusters`: oracle renders of their unseen prompts (or, with
  `copy`, each of their own images against the others as demos), all admitted."""
  records = []
  for index, cluster in enumerate(clusters):
    subject = subject_by_id(world, cluster.subject_id)
    images, captions = list(cluster.images), list(cluster.captions)
    for j, prompt in enumerate(cluster.prompts):
      record_seed = index * len(cluster.prompts) + j
      for s in range(samples_per_prompt):
        if copy:  # image i is the target; the demos are the cluster's other images
          i = (j * samples_per_prompt + s) % len(images)
          image, prompt = images[i], captions[i]
          demos = images[:i] + images[i + 1:]
          demo_captions = captions[:i] + captions[i + 1:]
        else:
          image = world.render(subject, prompt, oracle_seed(record_seed, s))[0]
          demos, demo_captions = images, captions
        records.append({
            "image": image, "demos": demos, "demo_captions": demo_captions, "prompt": prompt,
            "subject_id": cluster.subject_id, "admitted": True, "extras": {},
            # No expert scored these: a delta that passes any lambda the demo configs use.
            "delta": 1.0, "clip_target": 1.0, "clip_demos_max": 0.0,
            "seed": record_seed, "sample_index": s})
  buffer_lib.BufferWriter(target).commit_round(
      0, records, info={"source": "copy" if copy else "oracle"},
      subject_ids=[c.subject_id for c in clusters])
  return len(records)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--from", dest="source", required=True, help="a workdir with a buffer")
  parser.add_argument("--to", dest="target", required=True, help="a new workdir")
  parser.add_argument("--subjects", type=int, default=0,
                      help="N > 0: a buffer of the first N training clusters instead of W's")
  parser.add_argument("--copy", action="store_true",
                      help="with --subjects: targets are the clusters' own images")
  args = parser.parse_args()
  if args.copy and not args.subjects:
    raise SystemExit("--copy needs --subjects=N")

  config = config_lib.validate(load_config(args.config, args.set))
  source, target = pathlib.Path(args.source), pathlib.Path(args.target)
  buffer_dir = experts_stage.buffer_dir(source)
  if not args.subjects and not (buffer_dir / buffer_lib.MANIFEST).exists():
    raise SystemExit(f"--from={source}: no experts buffer ({buffer_dir / buffer_lib.MANIFEST})")
  if target.exists():
    raise SystemExit(f"--to={target} exists; give a new directory")
  for name in COPIED:
    if (source / name).is_dir():
      shutil.copytree(source / name, target / name)
    elif (source / name).exists():
      (target / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source / name, target / name)
  world = world_lib.from_config(config)
  if args.subjects:
    clusters = list(pipeline.ClusterSource(str(target / "data"), "train"))
    if args.subjects > len(clusters):
      raise SystemExit(f"--subjects={args.subjects}: {source / 'data'} has {len(clusters)} "
                       f"training clusters")
    count = write_cluster_buffer(world, clusters[:args.subjects],
                                 experts_stage.buffer_dir(target), copy=args.copy)
    summary = target / "experts" / "summary.json"
    if not summary.exists():  # the apprentice stage waits for the experts until this exists
      summary.write_text(json.dumps({"rounds": 1, "records": count,
                                     "written_by": "benchmarks/probe_oracle_targets.py"}))
  else:
    count = write_oracle_buffer(world, buffer_dir, experts_stage.buffer_dir(target))
  print(f"{count} records with {'copy' if args.copy else 'oracle'} targets in "
        f"{experts_stage.buffer_dir(target)}")


if __name__ == "__main__":
  main()
