"""Models shipped in the package: suti/assets/NAME/, named 'embedded:NAME' in a config.

SuTI starts from a pre-trained text-to-image model and scores with a pre-trained CLIP and DINO.
None can be downloaded here, so the embedded world's are shipped: the demo's base
(`pretrain.base_checkpoint`) and its world CLIP and world DINO (`clip.path`, `dino.path`).
Each directory holds PROVENANCE_FILE, saying what it is, how it was made and with which config.
"""
from __future__ import annotations

import json
import pathlib

from suti import config_lib
from suti.config_lib import InputError

EMBEDDED_PREFIX = "embedded:"
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
PROVENANCE_FILE = "asset.json"
# The config keys a world CLIP / DINO is tied to: it knows one image size and one rendering.
WORLD_MODEL_FIELDS = ("image_size", "data.world.background_blur")


def is_embedded(value: str) -> bool:
  return value.startswith(EMBEDDED_PREFIX)


def known() -> list[str]:
  return sorted(p.name for p in ASSETS_DIR.glob("*") if (p / PROVENANCE_FILE).is_file())


def resolve(value: str, field: str) -> pathlib.Path:
  """A config value (a path, or 'embedded:NAME') -> its directory; `field` names the key."""
  if not is_embedded(value):
    return pathlib.Path(value)
  name = value[len(EMBEDDED_PREFIX):]
  path = ASSETS_DIR / name
  if not name or not (path / PROVENANCE_FILE).is_file():
    raise InputError(f"{field} {value!r}: no embedded model {name!r} in {ASSETS_DIR}; "
                     f"embedded models: {known()}")
  return path


def provenance(path) -> dict | None:
  """The PROVENANCE_FILE of an asset directory, or None for a directory without one."""
  file = pathlib.Path(path) / PROVENANCE_FILE
  return json.loads(file.read_text()) if file.is_file() else None


def check_world_model(config, value: str, field: str) -> None:
  """Raises InputError if the embedded world model `value` (config key `field`) was made with
  other WORLD_MODEL_FIELDS than `config` has."""
  made = (provenance(resolve(value, field)) or {}).get("config", {})
  for key in WORLD_MODEL_FIELDS:
    want = config_lib.lookup(config, key)
    if key in made and made[key] != want:
      raise InputError(f"{field} {value!r} was made with {key}={made[key]!r}; this config "
                       f"has {key}={want!r}: train one in the run (--config.{field}=) or use "
                       f"one made for it")


# The files of a Hugging Face model directory that a world CLIP / DINO asset keeps (not the
# stage's checkpoints/ or logs/).
HF_FILES = ("config.json", "flax_model.msgpack", "preprocessor_config.json", "vocab.json",
            "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def ship_hf_dir(source, name: str, what: str, made_by: str) -> pathlib.Path:
  """Copies a finished stage's Hugging Face directory (W/clip, W/dino) to suti/assets/NAME.

  PROVENANCE_FILE records `what` and `made_by`, the run's config (W/config.json) for the
  image size, the world's rendering and the model's section, and the stage's summary.json.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  source = pathlib.Path(source)
  summary_file, config_file = source / "summary.json", source.parent / "config.json"
  for file in (summary_file, config_file):
    if not file.is_file():
      raise InputError(f"{file} is missing: ship a directory whose stage has finished")
  run_config = json.loads(config_file.read_text())
  section = source.name  # 'clip' or 'dino'
  config = {key: config_lib.lookup(run_config, key) for key in WORLD_MODEL_FIELDS}
  config[section] = run_config[section]
  target = ASSETS_DIR / name
  target.mkdir(parents=True, exist_ok=True)
  for file in HF_FILES:
    if (source / file).is_file():
      shutil.copy2(source / file, target / file)
  summary = dict(json.loads(summary_file.read_text()), path=f"W/{section}")  # not this host's
  record = {"what": what, "made_by": made_by, "config": config, "summary": summary}
  (target / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
  return target


def ship_world_scorers(workdir) -> list[pathlib.Path]:
  """W/clip and W/dino of a configs/world_scorers.py run -> world_{clip,dino}_<image size>."""
  made_by = ("python -m suti.launch --config=configs/world_scorers.py --workdir=W; "
             "python -m suti.assets W")
  workdir = pathlib.Path(workdir)
  if not (workdir / "config.json").is_file():
    raise InputError(f"{workdir / 'config.json'} is missing: not a finished run's workdir")
  image_size = json.loads((workdir / "config.json").read_text())["image_size"]
  return [ship_hf_dir(workdir / "clip", f"world_clip_{image_size}",
                      "the world CLIP of configs/demo.py (delta-CLIP filter, CLIP-T, CLIP-I)",
                      made_by),
          ship_hf_dir(workdir / "dino", f"world_dino_{image_size}",
                      "the world DINO of configs/demo.py (DINO, MDINO)", made_by)]


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel
  if len(sys.argv) != 2:
    sys.exit("usage: python -m suti.assets WORKDIR  (a finished configs/world_scorers.py run)")
  for shipped in ship_world_scorers(sys.argv[1]):
    print(shipped)
