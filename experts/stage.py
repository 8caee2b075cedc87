"""Stage `experts`: SuTI Algorithm 1, lines 4-13, in rounds.

Each round dequeues the next K training subjects, fine-tunes one expert per subject from the
base model (packed on the 'expert' mesh axis, `experts.parallel`), samples pseudo-targets for
each subject's unseen prompts, scores every sample with delta-CLIP (Eq. 6) against its demos,
and commits the round to the buffer: admitted samples (delta > lambda and, with
experts.min_demo_identity set, identity to the demos >= it) and rejected ones, so lambda can
be re-applied later.

Reads workdir/data (train clusters), the base checkpoint, workdir/clip (and workdir/dino for
the world's oracle comparison and, with experts.min_demo_identity, the identity filter);
writes workdir/experts/:
  buffer/                  the buffer G (experts.buffer): manifest.json + ArrayRecord shards
  logs/                    TensorBoard + metrics.jsonl: acceptance rate, delta histogram,
                           seconds per round, experts per hour
  grids/round_NNNNNN.png   one row per sample: demos | pseudo-target | delta bar
  summary.json             written when every round is committed

Rounds are fixed by the data alone (subjects in dataset order, too-few-demo ones skipped), and
round r's noise comes from (seed, r) only, so a killed run restarts at the first uncommitted
round and writes the same buffer an uninterrupted run would.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time

import numpy as np

from experts import buffer as buffer_lib
from experts import parallel
from suti import files
from suti import mesh as mesh_lib
from suti import pretrain
from suti import scoring
from suti import train_lib
from suti.data import images as images_lib
from suti.data import pipeline
from suti.data import world as world_lib

log = logging.getLogger("suti.experts")


def stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "experts"


def buffer_dir(workdir) -> pathlib.Path:
  return stage_dir(workdir) / "buffer"


def plan_rounds(clusters, num_experts: int, min_demos: int, num_rounds: int = 0):
  """(rounds, skipped): rounds are lists of indices into `clusters`, K at a time (the last may
  be smaller); `skipped` are the subject ids with fewer than `min_demos` images.
  num_rounds > 0 keeps only the first num_rounds rounds."""
  usable, skipped = [], []
  for i, cluster in enumerate(clusters):
    (usable if len(cluster.images) >= min_demos else skipped).append(i)
  rounds = [usable[i:i + num_experts] for i in range(0, len(usable), num_experts)]
  if num_rounds > 0:
    rounds = rounds[:num_rounds]
  return rounds, [clusters[i].subject_id for i in skipped]


def subject_prompts(cluster, count: int) -> list[str]:
  """The subject's first `count` unseen prompts (cycled when it has fewer)."""
  prompts = cluster.prompts or cluster.captions[:1]
  return [prompts[i % len(prompts)] for i in range(count)]


class OracleJudge:
  """How a pseudo-target compares with the world's true answer to its prompt.

  The world renders what the subject looks like in any prompt (`World.render`); the DINO-like
  identity encoder's cosine between the sample and that render says whether the expert drew
  *this* subject, and CLIP-T of the render is the best prompt score possible. Real photos have
  no oracle: `extras` is then empty.
  """

  def __init__(self, config, workdir):
    self.world = world_lib.from_config(config)
    self.dino = scoring.load_dino(config, workdir)
    self.seed = config.seed
    self.identity = DemoIdentity(self.dino)

  def extras(self, cluster, prompt: str, samples: np.ndarray, clip) -> list[dict]:
    if not cluster.spec:
      return [{} for _ in samples]
    subject = world_lib.Subject.from_json(cluster.spec)
    oracle, _ = self.world.render(subject, prompt, self.seed)
    oracle_dino = self.dino.embed_images(oracle[None])[0]
    dino = self.dino.embed_images(samples)
    clip_oracle = float(clip.score(oracle[None], [prompt])[0])
    return [{"oracle_dino": float(d @ oracle_dino), "demo_dino": float(demo),
             "oracle_clip_t": clip_oracle}
            for d, demo in zip(dino, self.identity(cluster, dino))]


class DemoIdentity:
  """A sample's identity to its subject: the mean cosine of its DINO-analogue embedding to
  those of the subject's demos (embedded once per subject, not per prompt or round)."""

  def __init__(self, dino):
    self.dino = dino
    self._demo_embeddings = {}  # subject id -> [n, D]

  def __call__(self, cluster, sample_embeddings: np.ndarray) -> np.ndarray:
    if cluster.subject_id not in self._demo_embeddings:
      self._demo_embeddings[cluster.subject_id] = self.dino.embed_images(
          np.stack(cluster.images))
    return (sample_embeddings @ self._demo_embeddings[cluster.subject_id].T).mean(axis=1)


class IdentityFilter:
  """experts.min_demo_identity: a sample's identity is the mean cosine of its DINO-analogue
  embedding to those of its own demos (the evaluation's DINO, against demos, not held-out
  photos). delta-CLIP only asks that a sample follow its prompt better than the demos do; in
  the world it does not see whether the expert drew *this* subject at all (RESULTS, issue 7).
  """

  def __init__(self, identity: DemoIdentity, threshold: float):
    self.identity = identity
    self.threshold = threshold

  def scores(self, group, owners, targets) -> list[float]:
    """One score per target; owners[i] = (index into group, sample index)."""
    out = [0.0] * len(targets)
    for k, cluster in enumerate(group):
      rows = [i for i, (owner, _) in enumerate(owners) if owner == k]
      if not rows:
        continue
      samples = self.identity.dino.embed_images(np.stack([targets[i] for i in rows]))
      for i, value in zip(rows, self.identity(cluster, samples)):
        out[i] = float(value)
    return out


def round_tiles(records) -> tuple[np.ndarray, int]:
  """(tiles, columns) of a round's grid: demos | pseudo-target | delta bar, a row per sample.

  The bar's length is delta (full width = 0.2), green when admitted, red otherwise.
  """
  width = max(len(r["demos"]) for r in records) + 2
  tiles = []
  for r in records:
    size = r["image"].shape[0]
    demos = images_lib.pad_row(r["demos"], width - 2)
    bar = np.full_like(r["image"], 255)
    filled = int(round(np.clip(r["delta"] / 0.2, 0, 1) * size))
    colour = (40, 170, 60) if r["admitted"] else (200, 40, 40)
    bar[size // 3: 2 * size // 3, :max(filled, 1)] = colour
    tiles += demos + [r["image"], bar]
  return np.stack(tiles), width


def run(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  out = stage_dir(workdir)
  ec = config.experts
  summary_path = out / "summary.json"
  clusters = list(pipeline.ClusterSource(workdir / "data", "train"))
  rounds, skipped = plan_rounds(clusters, ec.num_experts, ec.min_demos, ec.num_rounds)
  if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    if summary.get("rounds", 0) >= len(rounds):
      log.info("experts: complete (%s); skipping", summary_path)
      return summary
    # A config with more rounds than the finished run (experts.num_rounds raised): go on
    # from the committed buffer rather than stop at the old summary.
    log.info("experts: %s covers %d rounds, this config makes %d; continuing", summary_path,
             summary.get("rounds", 0), len(rounds))
  if skipped:
    log.warning("experts: %d subjects have fewer than %d images and are skipped: %s",
                len(skipped), ec.min_demos, ", ".join(skipped[:10]))
  writer_buffer = buffer_lib.BufferWriter(buffer_dir(workdir))
  first = writer_buffer.next_round()
  if first > len(rounds):
    raise ValueError(f"the buffer in {buffer_dir(workdir)} has {first} rounds but this config "
                     f"makes only {len(rounds)}; it was written by another config")
  if first:
    log.info("experts: rounds 0-%d are committed; resuming at round %d", first - 1, first)

  model, trainable, frozen = pretrain.load_base(config, workdir)
  base_unet, shared = parallel.split_base(trainable, frozen)
  clip = scoring.load_clip(config, workdir)
  judge = OracleJudge(config, workdir) if all(c.spec for c in clusters) else None
  mesh = mesh_lib.mesh_from_config(config, parallel.AXIS)
  writer = train_lib.MetricWriter(out / "logs")
  threshold = float(ec.delta_clip_threshold)
  # With the world's judge, the filter shares its DINO model and demo embeddings.
  identity = None if ec.min_demo_identity is None else IdentityFilter(
      judge.identity if judge else DemoIdentity(scoring.load_dino(config, workdir)),
      float(ec.min_demo_identity))
  per_subject = ec.prompts_per_subject * ec.samples_per_prompt
  start = time.time()

  bar = train_lib.progress(len(rounds) * ec.num_steps, first * ec.num_steps, "experts")
  try:
    for round_ in range(first, len(rounds)):
      round_start = time.time()
      group = [clusters[i] for i in rounds[round_]]
      prompts = [subject_prompts(c, ec.prompts_per_subject) for c in group]
      bar.set_description(f"experts round {round_ + 1}/{len(rounds)}")
      images, losses, finite = parallel.finetune_and_sample(
          config, model, base_unet, shared, group, round_, mesh, prompts=prompts,
          callback=lambda step, losses: bar.update(1))
      records = score_round(config, clip, judge, group, prompts, images, finite, round_,
                            threshold, identity)
      info = {"threshold": threshold, **({} if identity is None else {
                  buffer_lib.IDENTITY_THRESHOLD: identity.threshold}),
              "seconds": round(time.time() - round_start, 2),
              "failed_experts": [c.subject_id for c, ok in zip(group, finite) if not ok],
              "losses": [float(x) for x in losses]}
      # Every process holds the same records (samples are gathered across hosts); one writes.
      if mesh_lib.is_main_process():
        writer_buffer.commit_round(round_, records, info=info,
                                   subject_ids=[c.subject_id for c in group])
        log_round(writer, out, round_, records, info, len(group), bar)
      mesh_lib.barrier(f"experts round {round_} committed")
  finally:
    bar.close()
    writer.close()

  manifest = buffer_lib.read_manifest(buffer_dir(workdir))
  stats = buffer_lib.stats(manifest)
  summary = {
      "rounds": len(rounds), "subjects": sum(len(r) for r in rounds),
      "skipped_subjects": skipped,
      "failed_experts": sum(len(r["info"]["failed_experts"]) for r in manifest["rounds"]),
      "samples": stats["admitted"] + stats["rejected"], "admitted": stats["admitted"],
      "acceptance_rate": stats["acceptance_rate"], "threshold": threshold,
      "min_demo_identity": ec.min_demo_identity,
      "samples_per_subject": per_subject, "buffer": str(buffer_dir(workdir)),
      "seconds_this_run": round(time.time() - start, 1), "devices": mesh.size,
  }
  summary.update(oracle_comparison(buffer_dir(workdir)))
  if mesh_lib.is_main_process():
    files.write_json(summary_path, summary)
  mesh_lib.barrier("experts summary written")
  return summary


def score_round(config, clip, judge, group, prompts, images, finite, round_, threshold,
                identity=None):
  """Buffer records for every sample of the round's finite experts (admitted or not).

  Admitted: delta > threshold, and with an `IdentityFilter`, identity >= its threshold.
  """
  ec = config.experts
  targets, demos, flat_prompts, owners = [], [], [], []
  for k, (cluster, ok) in enumerate(zip(group, finite)):
    if not ok:
      log.warning("experts: expert for %s had a non-finite loss or sample; dropped",
                  cluster.subject_id)
      continue
    for j in range(images.shape[1]):
      targets.append(images[k, j])
      demos.append(np.stack(cluster.images))
      flat_prompts.append(prompts[k][j // ec.samples_per_prompt])
      owners.append((k, j))
  if not targets:
    return []
  scores = clip.delta(np.stack(targets), demos, flat_prompts)
  extras = [{} for _ in targets]
  if judge is not None:  # one oracle render per (subject, prompt), all its samples at once
    rows_of = {}
    for i, (k, _) in enumerate(owners):
      rows_of.setdefault((k, flat_prompts[i]), []).append(i)
    for (k, prompt), rows in rows_of.items():
      samples = np.stack([targets[i] for i in rows])
      for i, e in zip(rows, judge.extras(group[k], prompt, samples, clip)):
        extras[i] = e
  if identity is not None:
    for i, value in enumerate(identity.scores(group, owners, targets)):
      extras[i] = {**extras[i], buffer_lib.IDENTITY: value}
  records = []
  for i, (k, j) in enumerate(owners):
    cluster = group[k]
    delta = float(scores["delta"][i])
    admitted = delta > threshold and (identity is None or
                                      extras[i][buffer_lib.IDENTITY] >= identity.threshold)
    records.append({
        "image": targets[i], "prompt": flat_prompts[i], "subject_id": cluster.subject_id,
        "demos": demos[i], "demo_captions": list(cluster.captions),
        "delta": delta, "clip_target": float(scores["clip_target"][i]),
        "clip_demos_max": float(scores["clip_demos_max"][i]),
        "seed": int(config.seed), "sample_index": j, "admitted": admitted,
        "extras": extras[i]})
  return records


def log_round(writer, out, round_, records, info, num_subjects, bar) -> None:
  admitted = sum(r["admitted"] for r in records)
  rate = admitted / max(len(records), 1)
  seconds = info["seconds"]
  writer.scalars(round_, {"experts/acceptance_rate": rate, "experts/admitted": admitted,
                          "experts/samples": len(records),
                          "experts/failed": len(info["failed_experts"]),
                          "experts/seconds_per_round": seconds,
                          "experts/experts_per_hour": num_subjects * 3600 / max(seconds, 1e-9)})
  if records:
    writer.histogram(round_, "experts/delta", [r["delta"] for r in records])
    grid = train_lib.save_grid(out / "grids" / f"round_{round_:06d}.png",
                               *round_tiles(records))
    writer.image(round_, "experts/round", grid)
  bar.set_postfix(accept=f"{rate:.2f}", s_round=f"{seconds:.0f}")
  log.info("experts: round %d committed: %d/%d samples admitted (%.0f s)", round_, admitted,
           len(records), seconds)


def oracle_comparison(directory) -> dict:
  """Admitted vs rejected samples against the world's oracle (empty for real photos)."""
  everything = buffer_lib.BufferSource(directory, threshold=-math.inf,
                                         identity_rule=False)
  rows = [(bool(r["admitted"]), r["extras"]) for r in everything]
  out = {}
  for key in ("oracle_dino", "demo_dino"):
    for name, admitted in (("admitted", True), ("rejected", False)):
      values = [e[key] for a, e in rows if a == admitted and key in e]
      if values:
        out[f"{key}_{name}"] = float(np.mean(values))
  return out
