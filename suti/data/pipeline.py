"""Reading subject clusters back: `tfds` random-access sources + grain, with resumable state.

Two views of one dataset: clusters (one record a subject: experts, apprentice, evaluation) and
pairs (one (image, caption) a record: CLIP and base-model pre-training).
"""
from __future__ import annotations

import functools
import json
import pathlib

import grain.python as grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from suti.data import builder as builder_lib
from suti.data.types import SubjectCluster


def find_dataset(path) -> pathlib.Path:
  """The TFDS version folder (with dataset_info.json) at or below `path`."""
  path = pathlib.Path(path)
  if not path.exists():
    raise builder_lib.DatasetError(f"dataset path {path} does not exist; run the data stage "
                                   f"(python -m suti.data or --stages=data) first")
  if (path / "dataset_info.json").exists():
    return path
  found = sorted(p.parent for p in path.glob("**/dataset_info.json"))
  if len(found) != 1:
    what = "no dataset" if not found else f"{len(found)} datasets ({', '.join(map(str, found))})"
    raise builder_lib.DatasetError(f"expected one subject-cluster dataset under {path}, "
                                   f"found {what}")
  return found[0]


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_cluster(record) -> SubjectCluster:
  """A TFDS record (bytes for text, uint8 arrays for images) -> SubjectCluster."""
  return SubjectCluster(
      subject_id=_text(record["subject_id"]),
      class_name=_text(record["class_name"]),
      images=[np.asarray(x, np.uint8) for x in record["images"]],
      captions=[_text(c) for c in record["captions"]],
      prompts=[_text(p) for p in record["prompts"]],
      masks=[np.asarray(m)[..., 0] > 127 for m in record["masks"]],
      spec=_text(record["spec"]),
  )


class ClusterSource(grain.RandomAccessDataSource):
  """Random access to decoded SubjectClusters of one split."""

  def __init__(self, path, split: str):
    self.path = find_dataset(path)
    builder = tfds.builder_from_directory(str(self.path))
    if split not in builder.info.splits:
      raise builder_lib.DatasetError(f"dataset {self.path} has no split {split!r}; it has "
                                     f"{', '.join(builder.info.splits.keys())}")
    self._records = builder.as_data_source(split=split)
    self.split = split

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index) -> SubjectCluster:
    return decode_cluster(self._records[index])

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def image_counts(self) -> list[int]:
    """Images per subject, cached beside the dataset (one pass over it the first time)."""
    cache = self.path / f"image_counts-{self.split}.json"
    if cache.exists():
      return json.loads(cache.read_text())
    counts = [len(self._records[i]["captions"]) for i in range(len(self))]
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts))
    tmp.replace(cache)
    return counts


class PairSource(grain.RandomAccessDataSource):
  """Every (image, caption) of a split as its own record: {'image', 'caption', 'subject'}.

  A record decodes its subject's whole cluster (every image and mask), so decoded clusters
  are kept, up to cache_clusters of them: without that, a pre-training input pipeline spent
  its time decoding ~10 PNGs per pair and topped out at ~700 pairs/s (RESULTS, issue 7).
  """

  def __init__(self, clusters: ClusterSource, cache_clusters: int = 8192):
    self._clusters = clusters
    counts = clusters.image_counts()
    self._subject = np.repeat(np.arange(len(counts)), counts)
    self._image = np.concatenate([np.arange(n) for n in counts]) if counts else np.zeros(0, int)
    self.cluster = functools.lru_cache(maxsize=cache_clusters)(self._decode)

  def _decode(self, subject: int) -> SubjectCluster:
    """Subject index -> its decoded cluster (`cluster(subject)` is this, cached)."""
    cluster = self._clusters[subject]
    for array in (*cluster.images, *cluster.masks):
      array.flags.writeable = False  # shared by every later read: no consumer may edit it
    return cluster

  @property
  def num_subjects(self) -> int:
    return len(self._clusters)

  def __len__(self) -> int:
    return len(self._subject)

  def __getitem__(self, index):
    subject, image = int(self._subject[index]), int(self._image[index])
    cluster = self.cluster(subject)
    return {"image": cluster.images[image], "caption": cluster.captions[image],
            "subject": subject}


READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def make_iterator(source, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, transform=None, random_transform=None,
                  drop_remainder=True, shard_by_process: bool = True):
  """A resumable iterator of batches (`get_state()` / `set_state()` are JSON-safe dicts).

  Each process of a multi-host job reads its own slice of the records. `transform(record)`
  maps one record to a dict of arrays; `random_transform(record, rng)` does the same with a
  numpy Generator that grain seeds per record, so a resumed iterator draws the same numbers.

  Two threads keep a few batches ahead. grain's default (16 threads, 500 elements ahead) spent
  minutes of decodes and oracle renders that training never consumed, and its threads held
  the GIL while the train step was being traced: tiny's pretrain step traced in 7 s, 2 s alone.
  """
  dataset = grain.MapDataset.source(source)
  if shard_by_process and jax.process_count() > 1:
    dataset = dataset[jax.process_index()::jax.process_count()]
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  dataset = dataset.repeat(num_epochs)
  if transform is not None:
    dataset = dataset.map(transform)
  if random_transform is not None:
    dataset = dataset.random_map(random_transform, seed=seed)
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  return iter(dataset.to_iter_dataset(READ_OPTIONS))

