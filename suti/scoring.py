"""Stage `clip`: the scoring models every later stage uses.

CLIP scores prompts and images (the delta-CLIP filter of the experts stage, CLIP-T, CLIP-I);
the DINO ViT scores subject identity (DINO, MDINO). Given real weights by path
(`clip.path`, `dino.path`), the stage only checks that they load; 'embedded:NAME' names a world
model shipped in the package (suti/assets, as configs/world_scorers.py made it). Otherwise, on
the embedded world, it trains small ones and saves them in the same Hugging Face format:
workdir/clip/ and workdir/dino/, so one loading path serves real and world models.
"""
from __future__ import annotations

import pathlib

from suti import assets
from suti import clip as clip_lib
from suti.config_lib import InputError
from suti import clip_train, identity_train, metrics


class ScoringModelError(InputError):
  """No scoring model is configured for a source the world models cannot score."""


def clip_dir(config, workdir) -> str:
  return _model_dir(config, "clip", clip_train.stage_dir(workdir))


def dino_dir(config, workdir) -> str:
  return _model_dir(config, "dino", identity_train.stage_dir(workdir))


def _model_dir(config, name: str, trained_dir) -> str:
  """config.<name>.path resolved ('embedded:NAME': checked against this config first), or
  the directory the stage trains the world model into."""
  value = config[name].path
  if not value:
    return str(trained_dir)
  if assets.is_embedded(value):
    assets.check_world_model(config, value, f"{name}.path")
  return str(assets.resolve(value, f"{name}.path"))


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
      if assets.is_embedded(path):  # a shipped world model: its held-out numbers, its making
        made = assets.provenance(assets.resolve(path, f"{name}.path"))
        summary[name].update({k: v for k, v in made.pop("summary", {}).items() if k != "path"})
        summary[name]["provenance"] = made
    elif config.data.source != "world":
      # The world models know only the world's words and subjects: real photos need real ones.
      raise ScoringModelError(f"{name}.path must point to a pretrained {name.upper()} "
                              f"directory when data.source={config.data.source!r}")
    else:
      summary[name] = train(config, workdir)
  return summary
