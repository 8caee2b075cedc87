"""Stage `clip`: the scoring models every later stage uses.

CLIP scores prompts and images (the delta-CLIP filter of the experts stage, CLIP-T, CLIP-I);
the DINO ViT scores subject identity (DINO, MDINO). Given real weights by path
(`clip.path`, `dino.path`), the stage only checks that they load. Otherwise, on the embedded
world, it trains small ones and saves them in the same Hugging Face format:
workdir/clip/ and workdir/dino/, so one loading path serves real and world models.
"""
from __future__ import annotations

import pathlib

from suti import clip as clip_lib
from suti.config_lib import InputError
from suti import clip_train, identity_train, metrics


class ScoringModelError(InputError):
  """No scoring model is configured for a source the world models cannot score."""


def clip_dir(config, workdir) -> str:
  return config.clip.path or str(clip_train.stage_dir(workdir))


def dino_dir(config, workdir) -> str:
  return config.dino.path or str(identity_train.stage_dir(workdir))


def load_clip(config, workdir) -> clip_lib.ClipScorer:
  return clip_lib.ClipScorer.from_pretrained(clip_dir(config, workdir))


def load_dino(config, workdir) -> metrics.DinoScorer:
  return metrics.DinoScorer.from_pretrained(dino_dir(config, workdir))


def run(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  summary = {}
  for name, path, train, load in (
      ("clip", config.clip.path, clip_train.train_world_clip, load_clip),
      ("dino", config.dino.path, identity_train.train_identity_encoder, load_dino)):
    if path:
      load(config, workdir)  # fails early, naming the missing file, before any other stage
      summary[name] = {"path": path, "trained": False}
    elif config.data.source != "world":
      # The world models know only the world's words and subjects: real photos need real ones.
      raise ScoringModelError(f"{name}.path must point to a pretrained {name.upper()} "
                              f"directory when data.source={config.data.source!r}")
    else:
      summary[name] = train(config, workdir)
  return summary
