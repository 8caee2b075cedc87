"""Stage `evaluate`: the DreamBench protocol on held-out subjects, every method side by side.

For each of the first `evaluate.num_subjects` eval subjects and each of its prompts (the world's
unseen prompts; DreamBench's prompt list), `evaluate.images_per_prompt` images from:
  base        the base model, no personalisation (the prompt names only the class)
  experts     one expert fine-tuned on the subject (the DreamBooth analogue; config.experts)
  suti        the apprentice in context, from `apprentice.num_inference_demos` demos
  suti_other_demos  a control: the apprentice given the *next* subject's demos (same prompts,
              same seeds). SuTI's DINO / CLIP-I above this row is what reading the demos adds;
              equal rows mean an apprentice that ignores its demos, whatever the other rows say
  dream_suti  the apprentice fine-tuned on the subject first (`apprentice.finetune_steps`)
  oracle      the world's true render of each prompt (the real-image reference row; world only)
All sample with `evaluate.sampler` and `evaluate.sample_steps`. Scores: DINO, CLIP-I, CLIP-T,
MDINO, MCLIP-I (`suti.metrics`) against the subject's real images, and seconds per subject;
plus SuTI's curve over 1..`evaluate.max_demos` demos.

Each mean comes with its standard error over subjects, and SuTI's difference from the experts
(the issue's "at least the experts'") is also given paired over subjects: the same subjects,
prompts and seeds, so what is hard for both cancels and the error is what the difference has.

Writes workdir/evaluate/: methods/<name>.npz (each method's images and seconds, so an
interrupted run resumes at the next method, with a key of what they depend on: a method whose
settings, base or apprentice checkpoint changed since is drawn again), grid.png (a row per
subject: demos | each method | oracle, first prompt), table.md (Table 1 of the paper, then
the paired line), summary.json (`table`, `suti_minus_experts`, `demo_curve`, `demo_gain`).
"""
from __future__ import annotations

import functools
import json
import logging
import pathlib
import time

from etils import epath
import jax
import numpy as np

from suti import checkpoint as checkpoint_lib
from suti import files
from suti import metrics
from suti import pretrain
from suti import scoring
from suti import train_lib
from suti.config_lib import InputError
from suti.data import pipeline
from suti.data import world as world_lib

log = logging.getLogger("suti.evaluate")

METHODS = ("base", "experts", "suti", "suti_other_demos", "dream_suti", "oracle")
METRIC_COLUMNS = ("dino", "clip_i", "clip_t", "mdino", "mclip_i")


def stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "evaluate"


def eval_subjects(config, workdir) -> tuple[list, list[list[str]]]:
  """(clusters, prompts per cluster): the first evaluate.num_subjects held-out subjects with
  at least apprentice.num_inference_demos images, and their first prompts_per_subject prompts."""
  ev = config.evaluate
  clusters, prompts = [], []
  for cluster in pipeline.ClusterSource(pathlib.Path(workdir) / "data", "eval"):
    if len(cluster.images) < config.apprentice.num_inference_demos or not cluster.prompts:
      continue
    clusters.append(cluster)
    count = ev.prompts_per_subject or len(cluster.prompts)
    prompts.append(list(cluster.prompts[:count]))
    if len(clusters) == ev.num_subjects:
      break
  if not clusters:
    raise InputError(f"evaluate: no eval subject in {workdir}/data has >= "
                     f"{config.apprentice.num_inference_demos} images and a prompt")
  return clusters, prompts


def _sampling(config):
  """config with the experts sampling as evaluate asks (same sampler and steps everywhere)."""
  ev = config.evaluate
  config = config.copy_and_resolve_references()
  config.experts.sampler = ev.sampler
  config.experts.sample_steps = ev.sample_steps
  config.experts.samples_per_prompt = ev.images_per_prompt
  config.apprentice.sampler = ev.sampler
  config.apprentice.sample_steps = ev.sample_steps
  return config


# ------------------------------------------------------------------------------ methods

class Models:
  """The base model and the apprentice, each read from disk once per evaluation, so every
  method and every point of the demo curve shares one model object (and its compiled
  samplers) instead of reloading and recompiling."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir

  @functools.cached_property
  def base(self):
    return pretrain.load_base(self.config, self.workdir)

  @functools.cached_property
  def apprentice(self):
    from apprentice import generate as gen  # pylint: disable=import-outside-toplevel
    from apprentice import stage as apprentice_stage  # pylint: disable=import-outside-toplevel
    return gen.load(apprentice_stage.checkpoint_dir(self.workdir), config=self.config)


def run_base(config, models, clusters, prompts):
  ev = config.evaluate
  model, trainable, frozen = models.base
  images, seconds = [], []
  for i, ps in enumerate(prompts):
    start = time.perf_counter()
    batch = [p for p in ps for _ in range(ev.images_per_prompt)]
    out = model.sample(trainable, frozen, batch, jax.random.PRNGKey(config.seed + i),
                       sampler=ev.sampler, steps=ev.sample_steps,
                       guidance=config.experts.guidance)
    images.append(train_lib.to_uint8(out))
    seconds.append(time.perf_counter() - start)
  return images, seconds


def run_experts(config, models, clusters, prompts):
  from experts import parallel  # pylint: disable=import-outside-toplevel
  from suti import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  model, trainable, frozen = models.base
  base_unet, shared = parallel.split_base(trainable, frozen)
  mesh = mesh_lib.mesh_from_config(config, parallel.AXIS)
  k = config.experts.num_experts
  images, seconds = [], []
  for start_index in range(0, len(clusters), k):
    group = clusters[start_index:start_index + k]
    group_prompts = prompts[start_index:start_index + k]
    # One compiled sampler draws the same number of prompts for every expert: subjects with
    # fewer (DreamBench's live and object lists may differ) repeat their last, trimmed after.
    most = max(len(ps) for ps in group_prompts)
    start = time.perf_counter()
    out, _, _ = parallel.finetune_and_sample(
        config, model, base_unet, shared, group, round_=1000 + start_index, mesh=mesh,
        prompts=[ps + ps[-1:] * (most - len(ps)) for ps in group_prompts])
    per_subject = (time.perf_counter() - start) / len(group)
    images += [x[:len(ps) * config.evaluate.images_per_prompt]
               for x, ps in zip(out, group_prompts)]
    seconds += [per_subject] * len(group)
  return images, seconds


def run_suti(config, models, clusters, prompts, *, num_demos=None, finetune=False,
             demos_of_subject=0):
  """demos_of_subject=k: subject i is drawn from subject (i + k)'s demos (the control)."""
  from apprentice import generate as gen  # pylint: disable=import-outside-toplevel

  ev, ac = config.evaluate, config.apprentice
  model, params, frozen = models.apprentice
  num_demos = num_demos or ac.num_inference_demos
  images, seconds = [], []
  for i, ps in enumerate(prompts):
    cluster = clusters[(i + demos_of_subject) % len(clusters)]
    demos, captions = list(cluster.images[:num_demos]), list(cluster.captions[:num_demos])
    start = time.perf_counter()
    subject_params = params
    if finetune:
      subject_params, _ = gen.finetune(model, params, frozen, list(cluster.images),
                                       captions=list(cluster.captions), seed=config.seed + i)
    # Fewer demos than num_inference_demos (the curve, small clusters) ride in masked slots:
    # the same images, and one compiled sampler for every point of the curve.
    out = [gen.generate(model, subject_params, frozen, demos, p, captions=captions,
                        num_images=ev.images_per_prompt, seed=config.seed + i,
                        pad_demos_to=ac.num_inference_demos)
           for p in ps]
    images.append(np.concatenate(out))
    seconds.append(time.perf_counter() - start)
  return images, seconds


def run_oracle(config, models, clusters, prompts):
  del models
  world = world_lib.from_config(config)
  ev = config.evaluate
  images = []
  for cluster, ps in zip(clusters, prompts):
    subject = world_lib.Subject.from_json(cluster.spec)
    images.append(np.stack([world.render(subject, p, config.seed + j)[0]
                            for p in ps for j in range(ev.images_per_prompt)]))
  return images, [0.0] * len(clusters)


def methods_to_run(config, num_subjects: int) -> list[str]:
  """config.evaluate.methods that apply to this source, config and number of subjects."""
  names = [m.strip() for m in config.evaluate.methods.split(",") if m.strip()]
  unknown = [m for m in names if m not in METHODS]
  if unknown:
    raise InputError(f"evaluate.methods: unknown {unknown}; choose from {METHODS}")
  if config.data.source != "world":
    names = [m for m in names if m != "oracle"]  # real photos have no oracle
  if not config.apprentice.finetune_steps:
    names = [m for m in names if m != "dream_suti"]
  if num_subjects < 2:  # no other subject's demos to give the control
    names = [m for m in names if m != "suti_other_demos"]
  return names


def _latest_checkpoint(directory) -> list | None:
  """[step, mtime] of the newest checkpoint in `directory` (None if none), local or on a
  bucket: a model trained again to the same step is saved anew, with a new mtime."""
  try:
    with checkpoint_lib.Checkpoints(directory, read_only=True) as ckpt:
      step = ckpt.latest_step()
  except FileNotFoundError:
    return None
  if step is None:
    return None
  return [step, epath.Path(ckpt.directory, str(step)).stat().mtime]


# Settings that cannot change a method's images: the experts stage's buffer (evaluate
# fine-tunes its own experts) and how often training logs.
_NOT_IN_KEY = {"experts": ("num_rounds", "delta_clip_threshold", "min_demo_identity"),
               "apprentice": ("log_every", "checkpoint_every", "sample_every")}


def _section(config, name: str) -> dict:
  return {k: v for k, v in config[name].to_dict().items() if k not in _NOT_IN_KEY[name]}


def method_key(config, workdir, name: str, clusters, prompts) -> str:
  """What the images of method `name` (or `suti_N_demos`) depend on, as JSON.

  A saved method whose key differs (e.g. drawn before the apprentice was trained again, or
  with another guidance) is drawn again instead of being mixed into a new table."""
  from apprentice import stage as apprentice_stage  # pylint: disable=import-outside-toplevel
  ev = config.evaluate
  key = {"method": name, "seed": config.seed, "sampler": ev.sampler,
         "sample_steps": ev.sample_steps, "images_per_prompt": ev.images_per_prompt,
         "subjects": [c.subject_id for c in clusters], "prompts": [list(p) for p in prompts]}
  if name != "oracle":  # every other method samples the base or a model made from it
    key.update(image_size=config.image_size, model=config.model.to_dict(),
               diffusion=config.diffusion.to_dict(), guidance=config.experts.guidance,
               base=[config.pretrain.base_checkpoint,
                     _latest_checkpoint(pretrain.base_checkpoint_dir(config, workdir))])
  if name == "experts":
    key["experts"] = _section(config, "experts")
  if name.startswith("suti") or name == "dream_suti":
    key.update(apprentice=_section(config, "apprentice"),
               apprentice_checkpoint=_latest_checkpoint(apprentice_stage.checkpoint_dir(workdir)))
  return json.dumps(key, sort_keys=True, default=str)


def _changed_fields(stored: str, key: str) -> list[str]:
  old, new = json.loads(stored), json.loads(key)
  return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def load_or_draw(path: pathlib.Path, fn, key: str):
  """A method's (images, seconds), computed once: saved to `path` (npz) with `key` (see
  `method_key`), and read back on a resume only while the key still matches."""
  if path.exists():
    data = np.load(path)
    stored = str(data["key"]) if "key" in data.files else None
    if stored == key:
      count = int(data["count"])
      return [data[f"images_{i}"] for i in range(count)], list(data["seconds"])
    reason = (f"was drawn with other {', '.join(_changed_fields(stored, key))}" if stored
              else "was saved without a key (by an older version)")
    log.warning("evaluate: %s %s; drawing it again", path, reason)
  images, seconds = fn()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, count=len(images), seconds=np.asarray(seconds), key=np.asarray(key),
           **{f"images_{i}": x for i, x in enumerate(images)})
  tmp.replace(path)
  return images, seconds


# ------------------------------------------------------------------------------ scoring

def score_subjects(images, prompts, clusters, clip, dino, images_per_prompt: int) -> list:
  """One method's metrics per subject (each a dict with its num_images)."""
  per_subject = []
  for generated, ps, cluster in zip(images, prompts, clusters):
    expanded = [p for p in ps for _ in range(images_per_prompt)]
    masks = np.stack(cluster.masks) if cluster.masks else None
    per_subject.append(metrics.subject_scores(generated, expanded, np.stack(cluster.images),
                                              clip=clip, dino=dino, reference_masks=masks))
  return per_subject


def score(images, prompts, clusters, clip, dino, images_per_prompt: int) -> dict:
  """Aggregated metrics of one method over the subjects (image-weighted, as DreamBench)."""
  return metrics.aggregate(score_subjects(images, prompts, clusters, clip, dino,
                                          images_per_prompt))


def demo_gain(table: dict) -> dict:
  """What SuTI's own demos add over another subject's: DINO and CLIP-I, suti minus control."""
  return {k: table["suti"][k] - table["suti_other_demos"][k] for k in ("dino", "clip_i")
          if k in table["suti"] and k in table["suti_other_demos"]}


def metric_label(metric: str) -> str:
  return metric.upper().replace("_", "-")  # clip_i -> CLIP-I


def _with_se(row: dict, metric: str, spec: str = ".3f") -> str:
  """'0.742 ± 0.021': the value, and its standard error when the row has one."""
  se = row.get(metric + "_se")
  return f"{row[metric]:{spec}}" + ("" if se is None else f" ± {se:.3f}")


def format_paired(difference: dict, a: str = "suti", b: str = "experts") -> str:
  """One line: a minus b per metric, with the paired standard error."""
  cells = [f"{metric_label(c)} {_with_se(difference, c, '+.3f')}"
           for c in METRIC_COLUMNS if c in difference]
  return (f"{a} minus {b}, paired over subjects (± : standard error of the per-subject "
          f"differences): " + ", ".join(cells) + ".")


def format_table(table: dict) -> str:
  """Markdown like the paper's Table 1: a row per method."""
  columns = [c for c in METRIC_COLUMNS if any(c in row for row in table.values())]
  lines = ["| method | " + " | ".join(metric_label(c) for c in columns)
           + " | s/subject |", "|---" * (len(columns) + 2) + "|"]
  for name, row in table.items():
    cells = [_with_se(row, c) if c in row else "" for c in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['seconds_per_subject']:.1f} |")
  if any(c + "_se" in row for row in table.values() for c in columns):
    lines.append("\n± : standard error over subjects (each subject's images drawn from its own "
                 "seeds).")
  return "\n".join(lines)


def grid(clusters, images_by_method, num_demos: int):
  """(tiles, columns): a row per subject: its demos, then each method's first image."""
  methods = list(images_by_method)
  tiles = []
  for i, cluster in enumerate(clusters):
    demos = list(cluster.images[:num_demos])
    tiles += demos + [images_by_method[m][i][0] for m in methods]
  return np.stack(tiles), num_demos + len(methods)


def run(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  out = stage_dir(workdir)
  summary_path = out / "summary.json"
  if summary_path.exists():
    log.info("evaluate: complete (%s); skipping", summary_path)
    return json.loads(summary_path.read_text())
  config = _sampling(config)
  ev = config.evaluate
  clusters, prompts = eval_subjects(config, workdir)
  clip = scoring.load_clip(config, workdir)
  dino = scoring.load_dino(config, workdir)
  runners = {"base": run_base, "experts": run_experts, "suti": run_suti,
             "suti_other_demos": lambda *a: run_suti(*a, demos_of_subject=1),
             "dream_suti": lambda *a: run_suti(*a, finetune=True), "oracle": run_oracle}
  names = methods_to_run(config, len(clusters))
  models = Models(config, workdir)
  images, table, per_subject = {}, {}, {}
  bar = train_lib.progress(len(names), 0, "evaluate")
  for name in names:
    bar.set_description(f"evaluate {name}")
    images[name], seconds = load_or_draw(
        out / "methods" / f"{name}.npz",
        lambda: runners[name](config, models, clusters, prompts),
        method_key(config, workdir, name, clusters, prompts))
    per_subject[name] = score_subjects(images[name], prompts, clusters, clip, dino,
                                       ev.images_per_prompt)
    table[name] = dict(metrics.aggregate(per_subject[name]),
                       seconds_per_subject=float(np.mean(seconds)))
    bar.update(1)
  bar.close()

  curve = {}
  if "suti" in names and ev.max_demos:
    most = min(ev.max_demos, min(len(c.images) for c in clusters))
    for n in range(1, most + 1):
      # The method row already drew SuTI with num_inference_demos demos: same images.
      path = (out / "methods" / "suti.npz" if n == config.apprentice.num_inference_demos
              else out / "methods" / f"suti_{n}_demos.npz")
      imgs, seconds = load_or_draw(
          path, lambda: run_suti(config, models, clusters, prompts, num_demos=n),
          method_key(config, workdir, path.stem, clusters, prompts))
      row = score(imgs, prompts, clusters, clip, dino, ev.images_per_prompt)
      curve[str(n)] = dict({k: row[k] for k in ("dino", "clip_i", "clip_t") if k in row},
                           seconds_per_subject=float(np.mean(seconds)))

  tiles, columns = grid(clusters, images, config.apprentice.num_inference_demos)
  train_lib.save_grid(out / "grid.png", tiles, columns=columns)
  markdown = format_table(table)
  paired = None
  if "suti" in per_subject and "experts" in per_subject:
    # The issue's test, "SuTI at least the experts'": the same subjects, prompts and seeds.
    paired = metrics.paired_difference(per_subject["suti"], per_subject["experts"])
    markdown += "\n\n" + format_paired(paired)
  (out / "table.md").write_text(markdown + "\n")
  summary = {"subjects": [c.subject_id for c in clusters],
             "prompts_per_subject": len(prompts[0]),
             "images_per_prompt": ev.images_per_prompt, "sampler": ev.sampler,
             "sample_steps": ev.sample_steps, "methods": names, "table": table,
             "demo_curve": curve, "grid": str(out / "grid.png"),
             "columns": ["demos"] * config.apprentice.num_inference_demos + names}
  if paired is not None:
    summary["suti_minus_experts"] = paired
  if "suti_other_demos" in table:
    summary["demo_gain"] = demo_gain(table)
  files.write_json(summary_path, summary)
  log.info("evaluate:\n%s", markdown)
  return summary
