"""Builds a subject-cluster dataset from the command line.

    python -m suti.data --source=dreambench --path=/data/dreambooth/dataset --out=/tmp/db

Warnings name every skipped image and subject; the last line printed is a JSON summary
(subjects, images, skipped_images, skipped_subjects, prompts, splits, path).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from suti import config_lib
from suti.data import builder, sources


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m suti.data", description=__doc__.split("\n")[0])
  parser.add_argument("--source", required=True, choices=config_lib.SOURCES)
  parser.add_argument("--path", default="", help="folder for the dreambench / folder sources")
  parser.add_argument("--out", required=True, help="output folder for the dataset")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--min_demos", type=int, default=3)
  parser.add_argument("--max_demos", type=int, default=10)
  parser.add_argument("--unique_token", default="", help="DreamBench prompts' {0} token")
  parser.add_argument("--split", default="train", help="split name for --source=folder")
  parser.add_argument("--world_seed", type=int, default=0)
  parser.add_argument("--world_train_subjects", type=int, default=64)
  parser.add_argument("--world_eval_subjects", type=int, default=16)
  return parser.parse_args(argv)


def config_from_args(args):
  config = config_lib.base_config()
  config.image_size = args.image_size
  config.data.source = args.source
  config.data.path = args.path
  config.data.min_demos = args.min_demos
  config.data.max_demos = args.max_demos
  config.data.unique_token = args.unique_token
  config.data.folder_split = args.split
  config.data.world.seed = args.world_seed
  config.data.world.num_train_subjects = args.world_train_subjects
  config.data.world.num_eval_subjects = args.world_eval_subjects
  # Only the data keys matter here; model keys must still be consistent with image_size.
  config.model.channel_mult = (1,)
  config.model.attention_resolutions = ()
  config.model.cross_attention_resolutions = ()
  config.apprentice.num_train_demos = min(config.apprentice.num_train_demos, args.min_demos)
  return config_lib.validate(config)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                      stream=sys.stderr)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = config_from_args(args)
    summary = builder.build(config, args.out)
  except (config_lib.ConfigError, sources.SourceError, builder.DatasetError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
