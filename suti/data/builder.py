"""The subject-cluster dataset: a TFDS builder writing ArrayRecord files, one example a subject.

TFDS runs here without TensorFlow because images are handed to it already PNG-encoded and the
files are read back with `tfds.data_source` (random access) + grain, never `tf.data`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from suti import files
from suti import config_lib
from suti.config_lib import InputError
from suti.data import images as images_lib
from suti.data import sources
from suti.data.types import SubjectCluster

log = logging.getLogger("suti.data")

BUILDER_NAME = "subject_clusters"
VERSION = "1.0.0"
FINGERPRINT_FILE = "build_config.json"
SUMMARY_FILE = "build_summary.json"


class DatasetError(InputError):
  """The dataset cannot be built or opened; the message says which path and why."""


@dataclasses.dataclass(eq=False)
class SubjectClustersConfig(tfds.core.BuilderConfig):
  image_size: int = 32


class SubjectClusters(tfds.core.GeneratorBasedBuilder):
  """One example per subject: its images, captions and masks, its class and unseen prompts."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, clusters_by_split=None, min_demos=3, max_demos=10,
               report: sources.SourceReport | None = None, **kwargs):
    self._clusters_by_split = clusters_by_split or {}
    self._min_demos, self._max_demos = min_demos, max_demos
    self.report = report or sources.SourceReport()
    self.counts = {}  # split -> {"subjects", "images", "prompts"}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="Subject clusters for SuTI: 3-10 images of one subject with captions, "
                    "plus unseen prompts.",
        features=tfds.features.FeaturesDict({
            "subject_id": tfds.features.Text(),
            "class_name": tfds.features.Text(),
            "images": tfds.features.Sequence(
                tfds.features.Image(shape=(size, size, 3), encoding_format="png")),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "masks": tfds.features.Sequence(
                tfds.features.Image(shape=(size, size, 1), encoding_format="png")),
            "prompts": tfds.features.Sequence(tfds.features.Text()),
            "spec": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, clusters)
            for split, clusters in self._clusters_by_split.items()}

  def _generate_examples(self, split, clusters):
    counts = self.counts.setdefault(split, {"subjects": 0, "images": 0, "prompts": 0})
    size = self.builder_config.image_size
    for cluster in clusters:
      cluster = self._usable(cluster, size)
      if cluster is None:
        continue
      counts["subjects"] += 1
      counts["images"] += len(cluster.images)
      counts["prompts"] += len(cluster.prompts)
      yield cluster.subject_id, {
          "subject_id": cluster.subject_id,
          "class_name": cluster.class_name,
          "images": [images_lib.encode_png(x) for x in cluster.images],
          "captions": list(cluster.captions),
          "masks": [images_lib.encode_png(m.astype(np.uint8)[..., None] * 255)
                    for m in cluster.masks],
          "prompts": list(cluster.prompts),
          "spec": cluster.spec,
      }
    if counts["subjects"] == 0:
      raise DatasetError(f"split {split!r} has no usable subject (each needs at least "
                         f"{self._min_demos} readable images); skipped: "
                         f"{[name for name, _ in self.report.skipped_subjects]}")

  def _usable(self, cluster: SubjectCluster, size: int) -> SubjectCluster | None:
    """Drops images past max_demos; a subject with fewer than min_demos is skipped."""
    if len(cluster.images) < self._min_demos:
      self.report.skip_subject(cluster.subject_id,
                               f"{len(cluster.images)} usable images, fewer than the "
                               f"minimum of {self._min_demos} demos")
      return None
    for image in cluster.images:
      if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise DatasetError(f"subject {cluster.subject_id!r}: image of shape {image.shape} "
                           f"and dtype {image.dtype}, expected ({size}, {size}, 3) uint8")
    if not cluster.prompts:
      log.warning("subject %s has no unseen prompts", cluster.subject_id)
    keep = self._max_demos
    return dataclasses.replace(cluster, images=cluster.images[:keep],
                               captions=cluster.captions[:keep], masks=cluster.masks[:keep])


def _fingerprint(config) -> dict:
  """What the dataset's content depends on: rebuilding with another value is a new dataset."""
  return {"image_size": config.image_size, "data": config.data.to_dict()}


def _with_new_fields(stored, defaults):
  """A stored fingerprint with the data fields added since it was written, at their defaults.

  A new field's default keeps the dataset as it was built before the field existed, so
  workdirs built then keep matching; stored values always win."""
  if not isinstance(stored, dict) or not isinstance(defaults, dict):
    return stored
  return {**defaults, **{k: _with_new_fields(v, defaults.get(k)) for k, v in stored.items()}}


def dataset_dir(out_dir, config) -> pathlib.Path:
  return pathlib.Path(out_dir) / BUILDER_NAME / config.data.source / VERSION


def build(config, out_dir) -> dict:
  """Builds the dataset named by `config.data` under out_dir; returns the summary.

  A complete dataset built from the same data config is reused; one built from another data
  config is never overwritten (an error says so), so committed work is not lost.
  """
  out_dir = pathlib.Path(out_dir)
  fingerprint_path = out_dir / FINGERPRINT_FILE
  summary_path = out_dir / SUMMARY_FILE
  fingerprint = _fingerprint(config)
  if fingerprint_path.exists():
    existing = _with_new_fields(json.loads(fingerprint_path.read_text()),
                                {"data": config_lib.base_config().data.to_dict()})
    if existing != fingerprint:
      raise DatasetError(f"{out_dir} holds a dataset built from another data config "
                         f"({fingerprint_path}); use another output folder or remove it")
    if summary_path.exists() and (dataset_dir(out_dir, config) / "dataset_info.json").exists():
      log.info("dataset in %s is complete; reusing it", out_dir)
      return json.loads(summary_path.read_text())

  report = sources.SourceReport()
  clusters_by_split = sources.open_source(config, report)  # checks the path before any write
  out_dir.mkdir(parents=True, exist_ok=True)
  fingerprint_path.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
  builder = SubjectClusters(
      config=SubjectClustersConfig(name=config.data.source, image_size=config.image_size),
      clusters_by_split=clusters_by_split, min_demos=config.data.min_demos,
      max_demos=config.data.max_demos, report=report, data_dir=str(out_dir),
      file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(verify_ssl=False))
  summary = {
      "path": str(dataset_dir(out_dir, config)),
      "source": config.data.source,
      "splits": {split: c["subjects"] for split, c in builder.counts.items()},
      "subjects": sum(c["subjects"] for c in builder.counts.values()),
      "images": sum(c["images"] for c in builder.counts.values()),
      "prompts": sum(c["prompts"] for c in builder.counts.values()),
      "skipped_images": len(report.skipped_images),
      "skipped_subjects": len(report.skipped_subjects),
      "skipped": {"images": [{"path": p, "reason": r} for p, r in report.skipped_images],
                  "subjects": [{"subject": s, "reason": r}
                               for s, r in report.skipped_subjects]},
  }
  files.write_json(summary_path, summary)  # the summary's presence marks the build complete
  return summary
