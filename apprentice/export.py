"""Stage `export`: the trained apprentice as one self-contained directory.

Reads workdir/apprentice/checkpoints (the latest step); writes workdir/export/:
  checkpoint/      an Orbax checkpoint with the apprentice's params and its config (no
                   optimizer state, no data position): what `suti.generate --checkpoint` and
                   `apprentice.generate.load` read
  config.json      the same config, for people
  text_encoder/    a frozen pretrained text encoder (CLIP / T5), copied, when the model uses one
  summary.json
Nothing in it points back at the workdir: copy the directory anywhere and generate from it.
"""
from __future__ import annotations

import json
import logging
import pathlib
import shutil

from apprentice import generate as generate_lib
from apprentice import stage as apprentice_stage
from apprentice.model import new_param_count
from suti import checkpoint as checkpoint_lib
from suti import files
from suti.config_lib import InputError
from suti.nn.unet import count_params

log = logging.getLogger("suti.export")

TEXT_ENCODER_DIR = "text_encoder"


def stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "export"


def checkpoint_dir(workdir) -> pathlib.Path:
  """What to pass to `suti.generate --checkpoint`."""
  return stage_dir(workdir) / "checkpoint"


def run(config, workdir) -> dict:
  del config  # the export is of what the apprentice stage trained, with its saved config
  workdir = pathlib.Path(workdir)
  out = stage_dir(workdir)
  summary_path = out / "summary.json"
  source = apprentice_stage.checkpoint_dir(workdir)
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    with checkpoint_lib.Checkpoints(source, read_only=True) as ckpt:
      if ckpt.latest_step() == summary["step"]:
        log.info("export: step %d already exported; skipping", summary["step"])
        return summary
  if not source.is_dir():
    raise InputError(f"export: no apprentice checkpoints in {source}; run the apprentice stage")
  with checkpoint_lib.Checkpoints(source, read_only=True) as ckpt:
    step = ckpt.latest_step()
  if step is None:
    raise InputError(f"export: no apprentice checkpoints in {source}; run the apprentice stage")
  model, params, _ = generate_lib.load(source, step)
  config = model.config.copy_and_resolve_references()

  # Build next to the destination, then swap it in: a failed export never leaves half a one.
  tmp = out.with_name(out.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  te = config.model.text_encoder
  if te.kind != "world":  # frozen weights live outside the params: bring them along
    shutil.copytree(te.path, tmp / TEXT_ENCODER_DIR)
    te.path = TEXT_ENCODER_DIR  # relative: `generate.load` resolves it against the export
  with checkpoint_lib.Checkpoints(tmp / "checkpoint") as ckpt:
    ckpt.save(step, params=params, config=config, meta={"stage": "export"})
  (tmp / "config.json").write_text(config.to_json_best_effort(indent=1, sort_keys=True))
  summary = {"step": step, "params": count_params(params),
             "new_params": new_param_count(params), "source": str(source),
             "checkpoint": str(checkpoint_dir(workdir)),
             "bytes": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())}
  files.write_json(tmp / "summary.json", summary)
  shutil.rmtree(out, ignore_errors=True)
  tmp.rename(out)
  return summary
