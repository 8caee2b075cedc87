"""Personalised images from a trained apprentice, in context: no workdir, no fine-tuning.

    python -m suti.generate --checkpoint=workdir/demo/apprentice/checkpoints \\
        --demo=a.png --demo=b.png --demo=c.png --prompt="a ... in the snow" \\
        --num_images=4 --seed=0 --out=samples/

Captions are optional (--caption once per demo). Guidance, sampler and steps default to the
config saved with the checkpoint (config.apprentice). --finetune_steps=N first fine-tunes the
apprentice on the demos themselves (Dream-SuTI), then generates. Writes out/sample_<i>.png and
out/grid.png (demos | samples) and prints a JSON line with the files and timings.
"""
from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

from absl import app
from absl import flags

from suti import hostmem

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Apprentice checkpoint directory.")
_DEMOS = flags.DEFINE_multi_string("demo", [], "A demo image of the subject (repeat: 3-5).")
_CAPTIONS = flags.DEFINE_multi_string("caption", [], "Optional caption per demo, in order.")
_PROMPT = flags.DEFINE_string("prompt", None, "What to draw the subject doing, or where.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Images to draw.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed, the same images.")
_OUT = flags.DEFINE_string("out", "samples", "Output directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddpm", "ddim"], "Default: the config's.")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).")
_MODE = flags.DEFINE_enum("guidance_mode", None, ["joint", "text_first", "image_first"],
                          "How text and demo guidance combine (default: the config's).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Joint guidance weight (paper: 15).")
_TEXT_GUIDANCE = flags.DEFINE_float("text_guidance", None, "Text weight (separate modes).")
_DEMO_GUIDANCE = flags.DEFINE_float("demo_guidance", None, "Demo weight (separate modes).")
_FINETUNE_STEPS = flags.DEFINE_integer(
    "finetune_steps", 0, "Dream-SuTI: fine-tune on the demos first (paper: 500).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  for name, value in (("checkpoint", _CHECKPOINT.value), ("prompt", _PROMPT.value)):
    if value is None:
      raise app.UsageError(f"--{name} is required")
  from suti.config_lib import InputError  # pylint: disable=import-outside-toplevel
  try:
    report = generate_to_files()
  except (InputError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report))


def generate_to_files() -> dict:
  # jax is imported once the flags are known to be sane.
  from apprentice import generate as gen  # pylint: disable=import-outside-toplevel
  from suti import train_lib  # pylint: disable=import-outside-toplevel
  from suti.data import images as images_lib  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  model, trainable, frozen = gen.load(_CHECKPOINT.value, _STEP.value)
  demos = gen.read_demos(_DEMOS.value, model.image_size)
  captions = _CAPTIONS.value or None
  loaded = time.perf_counter()
  if _FINETUNE_STEPS.value:
    trainable, _ = gen.finetune(model, trainable, frozen, demos, captions=captions,
                                num_steps=_FINETUNE_STEPS.value, seed=_SEED.value)
  tuned = time.perf_counter()
  guidance = gen.Guidance.from_config(model.config, mode=_MODE.value, guidance=_GUIDANCE.value,
                                      text_guidance=_TEXT_GUIDANCE.value,
                                      demo_guidance=_DEMO_GUIDANCE.value)
  images = gen.generate(model, trainable, frozen, demos, _PROMPT.value, captions=captions,
                        num_images=_NUM_IMAGES.value, seed=_SEED.value, sampler=_SAMPLER.value,
                        steps=_STEPS.value, guidance=guidance)
  done = time.perf_counter()
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    paths.append(out / f"sample_{i}.png")
    images_lib.save_png(image, paths[-1])
  columns = max(len(demos), len(images))
  tiles = (images_lib.pad_row(demos, columns, like=images[0])
           + images_lib.pad_row(images, columns))
  train_lib.save_grid(out / "grid.png", tiles, columns=columns)
  return {"images": [str(p) for p in paths], "grid": str(out / "grid.png"),
          "demos": len(demos), "prompt": _PROMPT.value, "seed": _SEED.value,
          "finetune_steps": _FINETUNE_STEPS.value, "guidance_mode": guidance.mode,
          "seconds": {"load": round(loaded - start, 2), "finetune": round(tuned - loaded, 2),
                      "generate": round(done - tuned, 2)}}


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # before jax starts: XLA:CPU's buffers on huge pages
  app.run(main)
