"""Checks of local Hugging Face model directories, shared by every loader (CLIP, DINO, T5).

A bad path fails before transformers is asked, with the directory and the missing file named.
"""
from __future__ import annotations

import os

# Weights files the Flax loaders read without torch, in the order they are preferred.
WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json", "model.safetensors")


def check_model_dir(path, what: str) -> str:
  """The first of WEIGHTS in `path`; FileNotFoundError naming `what`, the path and the file.

  `what` names the model in messages, e.g. "CLIP", "DINO model", "t5 text encoder".
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} directory {path!r} does not exist")
  if not has_file(path, "config.json"):
    raise FileNotFoundError(f"{what} directory {path!r} has no config.json")
  weights = next((w for w in WEIGHTS if has_file(path, w)), None)
  if weights is None:
    hint = (" (pytorch_model.bin is there, but reading it needs torch; convert it to "
            "model.safetensors or save Flax weights)" if has_file(path, "pytorch_model.bin")
            else "")
    raise FileNotFoundError(f"{what} directory {path!r} has no weights file: expected one of "
                            f"{', '.join(WEIGHTS)}{hint}")
  return weights


def has_file(path, name: str) -> bool:
  return os.path.isfile(os.path.join(os.fspath(path), name))
