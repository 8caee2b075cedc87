"""The on-disk buffer G of expert pseudo-targets, written one round at a time, read by grain.

Layout of a buffer directory:
  manifest.json                      the committed rounds; nothing else on disk counts
  admitted/round_000003.array_record samples with the expert's verdict "admitted"
  rejected/round_000003.array_record the others, kept so lambda can be re-applied later

A round is committed by writing both shards (temp name, fsync, rename, fsync dir) and then
rewriting the manifest the same way. A run killed in between leaves shards the manifest does
not list: readers ignore them and the next commit of that round overwrites them.

Each record is one msgpack map (keys sorted, so the bytes are deterministic):
  image: PNG bytes of uint8 [H, W, 3]     prompt: str        subject_id: str
  demos: list of PNG bytes [h, w, 3]      demo_captions: list of str, one per demo
  delta, clip_target, clip_demos_max: float (delta = clip_target - clip_demos_max)
  round, seed, sample_index: int          admitted: bool
  extras: {str: float} (e.g. oracle similarity), may be empty
The manifest also keeps every record's delta, so a new threshold is applied without reading
the shards. A round filtered on identity too (info["min_demo_identity"]) keeps every record's
extras["demo_identity"] in the manifest beside its delta, for the same reason.
"""
from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
import pathlib
import time
from typing import Any, Iterable, Iterator

from array_record.python import array_record_data_source
from array_record.python.array_record_module import ArrayRecordWriter
import msgpack
import numpy as np
import PIL.Image

from suti.config_lib import InputError
from suti.data.images import encode_png

log = logging.getLogger("suti.experts")

MANIFEST = "manifest.json"
SETS = ("admitted", "rejected")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # random access; PNG bytes do not compress
_STR_FIELDS = ("prompt", "subject_id")
_FLOAT_FIELDS = ("delta", "clip_target", "clip_demos_max")
_INT_FIELDS = ("seed", "sample_index")
FIELDS = ("image", "demos", "demo_captions", *_STR_FIELDS, *_FLOAT_FIELDS, *_INT_FIELDS,
          "admitted")  # required in every record given to `commit_round`; plus optional
OPTIONAL_FIELDS = ("round", "extras")
# The identity filter (experts.min_demo_identity): a record's score, in extras, and the
# round's threshold, in its info.
IDENTITY = "demo_identity"
IDENTITY_THRESHOLD = "min_demo_identity"


class ManifestError(InputError):
  """manifest.json is unreadable or malformed; the message names the file."""


def shard_name(kind: str, round_index: int) -> str:
  return f"{kind}/round_{round_index:06d}.array_record"


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _commit_file(tmp: pathlib.Path, final: pathlib.Path) -> None:
  """fsync tmp, rename it over final, fsync the directory: final is old or new, never torn."""
  fd = os.open(tmp, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
  os.replace(tmp, final)
  _fsync_dir(final.parent)


def _check_image(value, field: str) -> np.ndarray:
  array = np.asarray(value)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
    raise ValueError(f"record field {field!r}: expected uint8 [H, W, 3], "
                     f"got {array.dtype} {array.shape}")
  return array


def encode_record(record: dict, round_index: int) -> bytes:
  """Checks one sample (ValueError naming the bad field) and serializes it."""
  missing = [f for f in FIELDS if f not in record]
  unknown = sorted(set(record) - set(FIELDS) - set(OPTIONAL_FIELDS))
  if missing or unknown:
    raise ValueError(f"record fields: missing {missing}, unknown {unknown}")
  if record.get("round", round_index) != round_index:
    raise ValueError(f"record field 'round': {record['round']} but committing {round_index}")
  demos = [_check_image(d, f"demos[{i}]") for i, d in enumerate(record["demos"])]
  if not demos or len({d.shape for d in demos}) != 1:
    raise ValueError(f"record field 'demos': expected >= 1 images of one shape, "
                     f"got {[d.shape for d in demos]}")
  captions = list(record["demo_captions"])
  if len(captions) != len(demos) or not all(isinstance(c, str) for c in captions):
    raise ValueError(f"record field 'demo_captions': expected {len(demos)} strings")
  out = {"image": encode_png(_check_image(record["image"], "image")),
         "demos": [encode_png(d) for d in demos], "demo_captions": captions,
         "round": int(round_index)}
  for f in _STR_FIELDS:
    if not isinstance(record[f], str) or not record[f]:
      raise ValueError(f"record field {f!r}: expected a non-empty str, got {record[f]!r}")
    out[f] = record[f]
  extras = record.get("extras") or {}
  if not isinstance(extras, dict):
    raise ValueError(f"record field 'extras': expected a dict, got {type(extras).__name__}")
  floats = {f: record[f] for f in _FLOAT_FIELDS}
  floats.update({f"extras.{k}": v for k, v in extras.items()})
  for f, v in floats.items():
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
      raise ValueError(f"record field {f!r}: expected a finite float, got {v!r}")
  out.update({f: float(record[f]) for f in _FLOAT_FIELDS})
  out["extras"] = {str(k): float(v) for k, v in sorted(extras.items())}
  for f in _INT_FIELDS:
    if isinstance(record[f], (bool, np.bool_)) or not isinstance(record[f], numbers.Integral):
      raise ValueError(f"record field {f!r}: expected an int, got {record[f]!r}")
    out[f] = int(record[f])
  if not isinstance(record["admitted"], (bool, np.bool_)):
    raise ValueError(f"record field 'admitted': expected a bool, got {record['admitted']!r}")
  out["admitted"] = bool(record["admitted"])
  return msgpack.packb(dict(sorted(out.items())), use_bin_type=True)


def _decode_png(data: bytes) -> np.ndarray:
  with PIL.Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_record(data: bytes) -> dict[str, Any]:
  """Record bytes -> numpy dict: 'image' uint8 [H, W, 3], 'demos' uint8 [n, h, w, 3], ..."""
  r = msgpack.unpackb(data, raw=False)
  out = {"image": _decode_png(r["image"]),
         "demos": np.stack([_decode_png(d) for d in r["demos"]]),
         "demo_captions": list(r["demo_captions"]),
         "prompt": r["prompt"], "subject_id": r["subject_id"],
         "admitted": np.bool_(r["admitted"]),
         "extras": {k: np.float64(v) for k, v in r["extras"].items()}}
  out.update({f: np.float64(r[f]) for f in _FLOAT_FIELDS})
  out.update({f: np.int64(r[f]) for f in ("round", *_INT_FIELDS)})
  return out


def read_manifest(directory) -> dict:
  """The committed rounds ({"version": 1, "rounds": [...]}); empty when nothing is committed."""
  path = pathlib.Path(directory) / MANIFEST
  if not path.exists():
    return {"version": 1, "rounds": []}
  try:
    manifest = json.loads(path.read_text())
    rounds = manifest["rounds"]
    for i, r in enumerate(rounds):
      if (r["round"] != i or not {"subject_ids", "info"} <= set(r)
          or any(len(r[k]["deltas"]) != r[k]["count"] for k in SETS)):
        raise ValueError(f"round entry {i} is inconsistent")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ManifestError(f"corrupt buffer manifest {path}: {e!r}") from e
  return manifest


class BufferWriter:
  """Appends rounds to a buffer directory; the single writer (the experts stage) owns it."""

  def __init__(self, directory):
    self.directory = pathlib.Path(directory)
    for kind in SETS:
      (self.directory / kind).mkdir(parents=True, exist_ok=True)
    read_manifest(self.directory)  # fail early on a corrupt manifest

  def committed_rounds(self) -> list[int]:
    return [r["round"] for r in read_manifest(self.directory)["rounds"]]

  def next_round(self) -> int:
    return len(self.committed_rounds())

  def done_subject_ids(self) -> set[str]:
    """Subjects handled by a committed round (skipped ones included): resume skips them."""
    return {s for r in read_manifest(self.directory)["rounds"] for s in r["subject_ids"]}

  def commit_round(self, round_index: int, records: Iterable[dict], info: dict | None = None,
                   subject_ids: Iterable[str] = ()) -> dict:
    """Writes round `round_index`'s shards, then appends it to the manifest; returns its entry.

    `subject_ids` lists subjects handled without a record (skipped); those of `records` are
    added. `info` (JSON-serializable) is stored as is, e.g. {"threshold": 0.1, "step": ...};
    with a "threshold", an admitted record must have delta > threshold (the filter's promise).
    """
    manifest = read_manifest(self.directory)
    expected = len(manifest["rounds"])
    if round_index != expected:
      state = "is already committed" if round_index < expected else "is out of order"
      raise ValueError(f"buffer {self.directory}: round {round_index} {state}; "
                       f"the next round to commit is {expected}")
    info = dict(info or {})
    try:
      json.dumps(info)
    except TypeError as e:
      raise ValueError(f"commit_round info is not JSON-serializable: {e}") from e
    records = list(records)
    encoded = [encode_record(r, round_index) for r in records]  # all checked before writing
    lam = info.get("threshold")
    mu = info.get(IDENTITY_THRESHOLD)
    for r in records:
      if lam is not None and r["admitted"] and not r["delta"] > lam:
        raise ValueError(f"record field 'admitted': delta {r['delta']} <= threshold {lam}")
      if mu is not None:
        identity = (r.get("extras") or {}).get(IDENTITY)
        if identity is None:
          raise ValueError(f"record field 'extras.{IDENTITY}': missing, but the round's info "
                           f"has {IDENTITY_THRESHOLD}={mu}")
        if r["admitted"] and not identity >= mu:
          raise ValueError(f"record field 'admitted': {IDENTITY} {identity} < {mu}")
    entry = {"round": round_index,
             "subject_ids": sorted(set(subject_ids) | {r["subject_id"] for r in records}),
             "info": info}
    for kind in SETS:
      keep = [i for i, r in enumerate(records) if bool(r["admitted"]) == (kind == "admitted")]
      final = self.directory / shard_name(kind, round_index)
      tmp = final.with_name(f".{final.name}.tmp")
      writer = ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
      for i in keep:
        writer.write(encoded[i])
      writer.close()
      _commit_file(tmp, final)
      entry[kind] = {"file": shard_name(kind, round_index), "count": len(keep),
                     "deltas": [float(records[i]["delta"]) for i in keep]}
      if mu is not None:  # so a re-applied lambda keeps the round's identity rule
        entry[kind]["identities"] = [float(records[i]["extras"][IDENTITY]) for i in keep]
    manifest["rounds"].append(entry)
    tmp = self.directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _commit_file(tmp, self.directory / MANIFEST)
    return entry


class BufferSource:
  """grain RandomAccessDataSource over the rounds committed when it was made.

  threshold=None: the admitted records. A float: records of both sets with delta > threshold,
  i.e. lambda re-applied without re-running the experts (a round committed with an identity
  rule, info[IDENTITY_THRESHOLD], keeps it unless identity_rule=False: then every record with
  delta > threshold, e.g. all of them at -inf). The view never changes under a
  running pipeline; `refresh()` returns a new source that sees rounds committed since.
  """

  def __init__(self, directory, threshold: float | None = None, identity_rule: bool = True):
    self.directory = pathlib.Path(directory)
    self.threshold = threshold
    self.identity_rule = identity_rule
    self.manifest = read_manifest(self.directory)
    kinds = ("admitted",) if threshold is None else SETS
    paths, keys, offset = [], [], 0
    for r in self.manifest["rounds"]:
      for kind in kinds:
        shard = r[kind]
        if not shard["count"]:
          continue
        # "[0:n]": grain reads only what the manifest committed, without opening the file.
        paths.append(f"{self.directory / shard['file']}[0:{shard['count']}]")
        deltas = np.asarray(shard["deltas"], np.float64)
        if threshold is None:
          keep = np.arange(len(deltas))
        else:
          passed = deltas > threshold
          mu = r["info"].get(IDENTITY_THRESHOLD)
          if mu is not None and identity_rule:
            passed &= np.asarray(shard["identities"], np.float64) >= mu
          keep = np.flatnonzero(passed)
        keys.append(keep + offset)
        offset += len(deltas)
    self.rounds = [r["round"] for r in self.manifest["rounds"]]
    self._keys = np.concatenate(keys) if keys else np.zeros([0], np.int64)
    self._source = array_record_data_source.ArrayRecordDataSource(paths) if paths else None

  def __len__(self) -> int:
    return len(self._keys)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for a buffer of {len(self)} records")
    return decode_record(self._source[int(self._keys[index])])

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[i] for i in range(len(self)))

  def refresh(self) -> BufferSource:
    return BufferSource(self.directory, self.threshold, self.identity_rule)

  def stats(self) -> dict[str, Any]:
    return stats(self.manifest)


def wait_for(directory, min_records: int, timeout_s: float, poll_s: float = 5.0,
             threshold: float | None = None, give_up=None) -> BufferSource:
  """Polls until the buffer holds `min_records`: the apprentice starting beside the experts.

  TimeoutError after timeout_s, or as soon as give_up() is true (e.g. the experts stage has
  finished, so no more records will come).
  """
  deadline = time.monotonic() + timeout_s
  while True:
    source = BufferSource(directory, threshold)  # no manifest yet: an empty source
    if len(source) >= min_records:
      return source
    if time.monotonic() >= deadline or (give_up is not None and give_up()):
      raise TimeoutError(f"buffer {directory}: {len(source)} < {min_records} records "
                         f"after {timeout_s}s")
    log.info("buffer %s: %d/%d records; waiting", directory, len(source), min_records)
    time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def stats(manifest: dict) -> dict[str, Any]:
  """Counts, acceptance rate and deltas of a manifest, for reports."""
  deltas = {k: np.asarray([d for r in manifest["rounds"] for d in r[k]["deltas"]], np.float64)
            for k in SETS}
  n_adm, n_rej = len(deltas["admitted"]), len(deltas["rejected"])
  out = {"rounds": len(manifest["rounds"]), "admitted": n_adm, "rejected": n_rej,
         "acceptance_rate": n_adm / (n_adm + n_rej) if n_adm + n_rej else 0.0,
         "subjects": len({s for r in manifest["rounds"] for s in r["subject_ids"]})}
  for k in SETS:
    out[f"deltas_{k}"] = deltas[k]
    out[f"delta_{k}_mean"] = float(deltas[k].mean()) if len(deltas[k]) else float("nan")
  return out
