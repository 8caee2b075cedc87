"""Where subject clusters come from: the embedded world, a DreamBench folder, a generic folder.

Each source yields `SubjectCluster`s per split. Bad images are skipped (named in a warning and
counted in the `SourceReport`); subjects left with too few images are skipped by the builder.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from typing import Iterator

from suti.config_lib import InputError
from suti.config_lib import SOURCES as SOURCE_NAMES
from suti.data import images as images_lib
from suti.data.types import SubjectCluster

log = logging.getLogger("suti.data")

# DreamBench's live subjects (prompt list "Live Subject Prompts"); all other classes are objects.
LIVE_CLASSES = ("dog", "cat")
PROMPTS_FILE = "prompts_and_classes.txt"
CAPTIONS_FILE = "captions.txt"
CLASS_FILE = "class.txt"
PROMPTS_PER_SUBJECT_FILE = "prompts.txt"

# Re-contextualisation and property prompts used for generic folders without prompts.txt
# (the shape of DreamBench's object prompts, written with the class name).
DEFAULT_PROMPT_TEMPLATES = (
    "a {0} in the jungle", "a {0} in the snow", "a {0} on the beach",
    "a {0} on a cobblestone street", "a {0} on top of a wooden floor",
    "a {0} with a city in the background", "a {0} with a mountain in the background",
    "a {0} floating on top of water", "a red {0}", "a purple {0}", "a shiny {0}",
)


class SourceError(InputError):
  """The source folder itself is unusable (missing, empty, malformed table)."""


@dataclasses.dataclass
class SourceReport:
  """What was skipped while reading a source, and why."""
  skipped_images: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  skipped_subjects: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def skip_image(self, path, reason: str) -> None:
    log.warning("skipping image %s: %s", path, reason)
    self.skipped_images.append((str(path), reason))

  def skip_subject(self, name: str, reason: str) -> None:
    log.warning("skipping subject %s: %s", name, reason)
    self.skipped_subjects.append((name, reason))


def _existing_dir(path: str | pathlib.Path, what: str) -> pathlib.Path:
  if not str(path):
    raise SourceError(f"{what}: no path given (data.path / --path)")
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise SourceError(f"{what}: {path} does not exist")
  if not path.is_dir():
    raise SourceError(f"{what}: {path} is not a folder")
  return path


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in images_lib.IMAGE_SUFFIXES)


def _read_images(files, size: int, report: SourceReport):
  """Loads each file; unreadable ones are skipped and reported. Returns (names, arrays)."""
  names, arrays = [], []
  for path in files:
    try:
      arrays.append(images_lib.load_image(path, size))
      names.append(path.name)
    except images_lib.UnreadableImageError as e:
      report.skip_image(path, str(e.__cause__ or e))
  return names, arrays


def _fill(template: str, unique_token: str, class_token: str) -> str:
  """DreamBench's 'a {0} {1} ...'.format(unique, class), with the gap closed when unique=''."""
  return " ".join(template.format(unique_token, class_token).split())


# ----------------------------------------------------------------------------- world

def world_clusters(config) -> dict[str, Iterator[SubjectCluster]]:
  """The embedded world's training and held-out evaluation subjects."""
  from suti.data import world as world_lib  # rendering code is only needed for this source
  world = world_lib.from_config(config)
  wc = config.data.world
  ranges = {"train": (0, wc.num_train_subjects),
            "eval": (wc.first_eval_subject, wc.num_eval_subjects)}
  return {split: world.clusters(split, count, wc.min_images, wc.max_images,
                                wc.num_unseen_prompts, start=start)
          for split, (start, count) in ranges.items()}


# ----------------------------------------------------------------------------- dreambench

@dataclasses.dataclass
class DreamBenchTable:
  classes: dict[str, str]        # subject_name -> class
  object_prompts: list[str]      # templates with {0} unique token, {1} class token
  live_prompts: list[str]


_PROMPT_LINE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)""")


def parse_prompts_and_classes(path: pathlib.Path) -> DreamBenchTable:
  """Parses google/dreambooth's dataset/prompts_and_classes.txt."""
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except OSError as e:
    raise SourceError(f"cannot read {path}: {e}") from e
  classes, object_prompts, live_prompts = {}, [], []
  section = None
  for number, raw in enumerate(lines, start=1):
    line = raw.strip()
    lowered = line.lower()
    if lowered == "subject_name,class":
      section = "classes"
    elif lowered.startswith("object prompts"):
      section = "object"
    elif lowered.startswith("live subject prompts"):
      section = "live"
    elif lowered == "prompts":
      section = None
    elif section == "classes" and line:
      name, sep, cls = line.partition(",")
      if not sep or not name.strip() or not cls.strip():
        raise SourceError(f"{path}:{number}: expected 'subject_name,class', got {line!r}")
      classes[name.strip()] = cls.strip()
    elif section in ("object", "live"):
      match = _PROMPT_LINE.match(line)
      if match:
        (object_prompts if section == "object" else live_prompts).append(match.group(2))
  if not classes:
    raise SourceError(f"{path}: no 'subject_name,class' table found")
  if not object_prompts and not live_prompts:
    raise SourceError(f"{path}: no prompt lists found (lines like "
                      f"\"'a {{0}} {{1}} in the jungle'.format(unique_token, class_token),\")")
  return DreamBenchTable(classes, object_prompts, live_prompts or object_prompts)


def dreambench_clusters(path, image_size: int, report: SourceReport,
                        unique_token: str = "") -> dict[str, Iterator[SubjectCluster]]:
  """DreamBench: `dataset/<subject>/NN.jpg` + `dataset/prompts_and_classes.txt`; split 'eval'."""
  root = _existing_dir(path, "DreamBench folder")
  table_path = root / PROMPTS_FILE
  if not table_path.is_file():
    raise SourceError(f"DreamBench folder {root} has no {PROMPTS_FILE}")
  table = parse_prompts_and_classes(table_path)
  listed = set(table.classes)
  for extra in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in listed):
    report.skip_subject(extra, f"folder not listed in {PROMPTS_FILE}")

  def generate():
    for name, cls in table.classes.items():
      folder = root / name
      if not folder.is_dir():
        report.skip_subject(name, f"listed in {PROMPTS_FILE} but {folder} is missing")
        continue
      _, arrays = _read_images(_image_files(folder), image_size, report)
      templates = table.live_prompts if cls in LIVE_CLASSES else table.object_prompts
      caption = _fill("a {0} {1}", unique_token, cls)
      yield SubjectCluster(subject_id=name, class_name=cls, images=arrays,
                           captions=[caption] * len(arrays),
                           prompts=[_fill(t, unique_token, cls) for t in templates])

  return {"eval": generate()}


# ----------------------------------------------------------------------------- folder

def _class_from_folder_name(name: str) -> str:
  """'red_backpack2' -> 'red backpack': a folder's name, less numbering, as a class."""
  return re.sub(r"[\d_\-\s]+$", "", name).replace("_", " ").strip() or name


def _read_captions(path: pathlib.Path, report: SourceReport) -> dict[str, str]:
  """captions.txt: one '<file name><TAB><caption>' line per image."""
  captions = {}
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    name, sep, caption = line.partition("\t")
    if not sep or not caption.strip():
      log.warning("%s:%d: expected '<file name><TAB><caption>', got %r; line ignored",
                  path, number, line)
      continue
    captions[name.strip()] = caption.strip()
  return captions


def folder_clusters(path, image_size: int, report: SourceReport,
                    split: str = "train") -> dict[str, Iterator[SubjectCluster]]:
  """A generic folder `<root>/<subject>/*.{jpg,png}`.

  Optional files per subject folder: captions.txt ('<file><TAB><caption>' lines; default
  caption 'a <class>'), class.txt (the class; default the folder name without numbering),
  prompts.txt (unseen prompts, one a line; default re-contextualisation prompts).
  """
  root = _existing_dir(path, "image folder")
  subject_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not subject_dirs:
    raise SourceError(f"image folder {root} has no subject folders (expected "
                      f"{root}/<subject>/*.jpg)")

  def generate():
    for folder in subject_dirs:
      class_file = folder / CLASS_FILE
      cls = (class_file.read_text(encoding="utf-8").strip() if class_file.is_file() else
             _class_from_folder_name(folder.name))
      captions_file = folder / CAPTIONS_FILE
      captions = _read_captions(captions_file, report) if captions_file.is_file() else {}
      names, arrays = _read_images(_image_files(folder), image_size, report)
      prompts_file = folder / PROMPTS_PER_SUBJECT_FILE
      if prompts_file.is_file():
        prompts = [p.strip() for p in prompts_file.read_text(encoding="utf-8").splitlines()
                   if p.strip()]
      else:
        prompts = [t.format(cls) for t in DEFAULT_PROMPT_TEMPLATES]
      yield SubjectCluster(subject_id=folder.name, class_name=cls, images=arrays,
                           captions=[captions.get(n, f"a {cls}") for n in names],
                           prompts=prompts)

  return {split: generate()}


def open_source(config, report: SourceReport) -> dict[str, Iterator[SubjectCluster]]:
  """The source named by `config.data.source`, as {split: iterator of clusters}."""
  source = config.data.source
  if source == "world":
    return world_clusters(config)
  if source == "dreambench":
    return dreambench_clusters(config.data.path, config.image_size, report,
                               config.data.unique_token)
  if source == "folder":
    return folder_clusters(config.data.path, config.image_size, report,
                           config.data.folder_split)
  raise SourceError(f"data.source must be one of world, dreambench, folder; got {source!r}")
