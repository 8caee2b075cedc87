"""How well do experts copy their subject? Fine-tune one pack of experts on held-out subjects.

    python benchmarks/probe_expert_steps.py --out=e80.png
    python benchmarks/probe_expert_steps.py --out=e200.png --set=experts.num_steps=200

Fine-tunes config.experts.num_experts experts (configs/demo.py: 8, 80 steps at 1e-3) from the
config's base, one on each of the first held-out subjects of the embedded world (5 images
each), exactly as the `experts` stage does (`parallel.finetune_and_sample`). Each expert then
draws 2 of its training captions (can it reproduce what it saw?) and 2 unseen prompts (can it
move its subject?). Prints the seconds, each expert's last loss, and DINO / CLIP-I / CLIP-T of
the unseen-prompt samples against the subject's images; --out writes a grid, a row per
subject: 2 of its images | 2 caption samples | 2 unseen-prompt samples. Needs no workdir: the
world, base and scorers are the ones shipped in the package.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # pylint: disable=wrong-import-position

from bench_pretrain import load_config  # pylint: disable=wrong-import-position
from experts import parallel  # pylint: disable=wrong-import-position
from suti import config_lib, hostmem, metrics, pretrain, scoring, train_lib  # pylint: disable=wrong-import-position
from suti.data import world as world_lib  # pylint: disable=wrong-import-position

NUM_IMAGES = 5


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", default="", help="PNG grid of the samples")
  args = parser.parse_args()
  hostmem.reexec_with_huge_pages()  # what suti.launch runs with

  config = config_lib.validate(load_config(args.config, args.set))
  config.experts.samples_per_prompt = 1
  for key in ("pretrain.base_checkpoint", "clip.path", "dino.path"):  # no workdir to train them
    section, field = key.split(".")
    if not config[section][field]:
      raise SystemExit(f"--config needs {key} (configs/demo.py's: embedded:world_*_16)")
  no_workdir = os.devnull  # every model here comes from the config's paths
  model, trainable, frozen = pretrain.load_base(config, no_workdir)
  world = world_lib.from_config(config)
  clusters = list(world.clusters("eval", config.experts.num_experts, NUM_IMAGES, NUM_IMAGES, 2))
  prompts = [[c.captions[0], c.captions[1], c.prompts[0], c.prompts[1]] for c in clusters]
  unet, shared = parallel.split_base(trainable, frozen)

  start = time.perf_counter()
  images, losses, _ = parallel.finetune_and_sample(config, model, unet, shared, clusters, 0,
                                                   prompts=prompts)
  seconds = time.perf_counter() - start

  clip, dino = scoring.load_clip(config, no_workdir), scoring.load_dino(config, no_workdir)
  per_subject = [metrics.subject_scores(drawn[2:], subject_prompts[2:], np.stack(c.images),
                                        clip=clip, dino=dino)
                 for c, drawn, subject_prompts in zip(clusters, images, prompts)]
  unseen = {k: round(float(np.mean([s[k] for s in per_subject])), 3)
            for k in ("dino", "clip_i", "clip_t")}
  print(json.dumps({"overrides": args.set, "seconds_incl_compile": round(seconds, 1),
                    "losses": [round(float(x), 3) for x in losses], "unseen_prompts": unseen}))
  if args.out:
    tiles = [tile for c, drawn in zip(clusters, images)
             for tile in [np.asarray(c.images[2]), np.asarray(c.images[3]), *drawn]]
    train_lib.save_grid(args.out, np.stack(tiles), columns=6)


if __name__ == "__main__":
  main()
