"""The experts' on-disk buffer: round trips, re-filtering, crash safety, reading while writing."""
import pickle

import grain
import numpy as np
import pytest

from experts import buffer as buffer_lib

LAM = 0.05


def make_records(round_index, n=6, seed=0, size=(8, 8), skip_subject=None):
  """Samples as the experts stage would make them; admitted = delta > LAM."""
  rng = np.random.default_rng([round_index, seed])
  records = []
  for i in range(n):
    h, w = size if size else rng.integers(4, 12, size=2)
    target, demos = rng.uniform(0.2, 0.4), rng.uniform(0.1, 0.3, size=3)
    delta = float(target - demos.max())
    records.append({
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "demos": [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(3)],
        "demo_captions": [f"a photo of dog{i} #{j}" for j in range(3)],
        "prompt": f"a dog{i} on the beach",
        "subject_id": f"train-{round_index:03d}-{i % 3}",
        "delta": delta, "clip_target": float(target), "clip_demos_max": float(demos.max()),
        "seed": 1000 * round_index + i, "sample_index": i, "admitted": delta > LAM,
        "extras": {"oracle": float(rng.uniform())},
    })
  return records


def commit(directory, round_index, **kw):
  records = make_records(round_index, **kw)
  buffer_lib.BufferWriter(directory).commit_round(
      round_index, records, {"threshold": LAM}, subject_ids=[f"skipped-{round_index}"])
  return records


def by_key(records):
  return {(int(r["seed"]), int(r["sample_index"])): r for r in records}


def tree_files(directory):
  return {p.relative_to(directory).as_posix(): p.read_bytes()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_round_trip_bit_exact(tmp_path):
  written = commit(tmp_path, 0, n=8, size=None) + commit(tmp_path, 1, n=8, size=None)
  read = list(buffer_lib.BufferSource(tmp_path, threshold=-np.inf))
  assert len(read) == len(written) == 16
  read = by_key(read)
  for key, w in by_key(written).items():
    r = read[key]
    assert r["image"].dtype == np.uint8 and np.array_equal(r["image"], w["image"])
    assert r["demos"].shape == (3, 6, 6, 3) and np.array_equal(r["demos"], np.stack(w["demos"]))
    assert r["demo_captions"] == w["demo_captions"]
    for f in ("prompt", "subject_id", "delta", "clip_target", "clip_demos_max", "sample_index"):
      assert r[f] == w[f], f
    assert r["round"] == key[0] // 1000 and bool(r["admitted"]) == w["admitted"]
    assert r["extras"] == w["extras"]


def test_rejected_kept_and_refiltered(tmp_path):
  written = commit(tmp_path, 0, n=12) + commit(tmp_path, 1, n=12)
  admitted = [w for w in written if w["admitted"]]
  assert 0 < len(admitted) < len(written)  # the seeds give both verdicts
  source = buffer_lib.BufferSource(tmp_path)
  assert len(source) == len(admitted)
  assert all(r["admitted"] and r["delta"] > LAM for r in source)
  assert set(by_key(source)) == set(by_key(admitted))
  lower = LAM - 0.1
  refiltered = list(buffer_lib.BufferSource(tmp_path, threshold=lower))
  expected = by_key([w for w in written if w["delta"] > lower])
  assert set(by_key(refiltered)) == set(expected)
  assert any(not r["admitted"] for r in refiltered)  # rejected samples came back
  assert all(r["delta"] > lower for r in refiltered)
  stats = source.stats()
  assert (stats["admitted"], stats["rejected"]) == (len(admitted), len(written) - len(admitted))
  assert stats["acceptance_rate"] == pytest.approx(len(admitted) / len(written))
  assert np.all(stats["deltas_admitted"] > LAM) and np.all(stats["deltas_rejected"] <= LAM)


def test_identity_rule_is_kept_when_lambda_is_reapplied(tmp_path):
  """A round filtered on identity too: the manifest keeps each record's identity, a re-applied
  lambda re-admits only records that pass both, and the writer refuses a broken promise."""
  mu = 0.5
  records = make_records(0, n=12)
  for r in records:
    r["extras"]["demo_identity"] = float(r["extras"]["oracle"])  # uniform in [0, 1)
    r["admitted"] = r["delta"] > LAM and r["extras"]["demo_identity"] >= mu
  info = {"threshold": LAM, "min_demo_identity": mu}
  entry = buffer_lib.BufferWriter(tmp_path).commit_round(0, records, info)
  assert entry["admitted"]["identities"] == [r["extras"]["demo_identity"] for r in records
                                             if r["admitted"]]
  lower = LAM - 0.1
  passing = [r for r in records if r["delta"] > lower and r["extras"]["demo_identity"] >= mu]
  refiltered = list(buffer_lib.BufferSource(tmp_path, threshold=lower))
  assert set(by_key(refiltered)) == set(by_key(passing))
  assert 0 < len(passing) < sum(r["delta"] > lower for r in records)  # identity dropped some
  everything = buffer_lib.BufferSource(tmp_path, threshold=-np.inf, identity_rule=False)
  assert set(by_key(everything)) == set(by_key(records))
  cheat = make_records(1, n=4)
  for r in cheat:
    r["extras"]["demo_identity"] = 0.1
    r["admitted"] = True
  with pytest.raises(ValueError, match=r"'admitted': demo_identity 0.1 < 0.5"):
    buffer_lib.BufferWriter(tmp_path).commit_round(1, cheat, {"min_demo_identity": mu})
  del cheat[0]["extras"]["demo_identity"]
  with pytest.raises(ValueError, match=r"'extras.demo_identity': missing"):
    buffer_lib.BufferWriter(tmp_path).commit_round(1, cheat, {"min_demo_identity": mu})
  assert buffer_lib.BufferWriter(tmp_path).next_round() == 1  # nothing of round 1 committed


def test_kill_before_manifest_then_recommit_is_identical(tmp_path, monkeypatch):
  clean, killed = tmp_path / "clean", tmp_path / "killed"
  commit(clean, 0)
  commit(clean, 1)

  commit(killed, 0)
  before = buffer_lib.BufferSource(killed)
  real_commit_file = buffer_lib._commit_file

  def die_at_manifest(tmp, final):
    if final.name == buffer_lib.MANIFEST:
      raise KeyboardInterrupt("killed")
    real_commit_file(tmp, final)

  monkeypatch.setattr(buffer_lib, "_commit_file", die_at_manifest)
  with pytest.raises(KeyboardInterrupt):  # the killed run sampled something else for round 1
    commit(killed, 1, n=3, seed=7)
  monkeypatch.setattr(buffer_lib, "_commit_file", real_commit_file)
  assert (killed / buffer_lib.shard_name("admitted", 1)).exists()

  writer = buffer_lib.BufferWriter(killed)
  assert writer.committed_rounds() == [0] and writer.next_round() == 1
  assert writer.done_subject_ids() == {r["subject_id"] for r in make_records(0)} | {"skipped-0"}
  after = buffer_lib.BufferSource(killed, threshold=-np.inf)
  assert after.rounds == [0] and {int(r["round"]) for r in after} == {0}
  assert len(buffer_lib.BufferSource(killed)) == len(before)

  commit(killed, 1)
  assert tree_files(killed) == tree_files(clean)  # bytes of shards and manifest, no leftovers


def test_refresh_sees_rounds_committed_while_reading(tmp_path):
  commit(tmp_path, 0, n=12)
  source = buffer_lib.BufferSource(tmp_path, threshold=-np.inf)
  first = source[0]
  commit(tmp_path, 1, n=12)
  assert len(source) == 12 and source.rounds == [0]  # a snapshot: stable under a pipeline
  assert np.array_equal(source[0]["image"], first["image"])
  fresh = source.refresh()
  assert len(fresh) == 24 and fresh.rounds == [0, 1]
  assert {int(r["round"]) for r in fresh} == {0, 1}
  assert len(buffer_lib.wait_for(tmp_path, 24, timeout_s=0, threshold=-np.inf)) == 24
  with pytest.raises(TimeoutError, match="24 < 25"):
    buffer_lib.wait_for(tmp_path, 25, timeout_s=0.05, poll_s=0.01, threshold=-np.inf)


def test_empty_buffer_and_wait(tmp_path):
  source = buffer_lib.BufferSource(tmp_path / "nothing")
  assert len(source) == 0 and source.stats()["acceptance_rate"] == 0.0
  with pytest.raises(IndexError):
    source[0]
  with pytest.raises(TimeoutError):
    buffer_lib.wait_for(tmp_path / "nothing", 1, timeout_s=0)


def test_commit_old_or_future_round_raises(tmp_path):
  commit(tmp_path, 0)
  commit(tmp_path, 1)
  files = tree_files(tmp_path)
  with pytest.raises(ValueError, match="round 0 is already committed.*next .* is 2"):
    commit(tmp_path, 0)
  with pytest.raises(ValueError, match="round 3 is out of order"):
    commit(tmp_path, 3)
  assert tree_files(tmp_path) == files  # committed work untouched


def _broken(field, value):
  record = make_records(0, n=1)[0]
  if value is KeyError:
    del record[field]
  else:
    record[field] = value
  return record


@pytest.mark.parametrize("record,field", [
    (_broken("prompt", KeyError), "prompt"),
    (_broken("image", np.zeros((8, 8, 3), np.float32)), "image"),
    (_broken("image", np.zeros((8, 8), np.uint8)), "image"),
    (_broken("demos", [np.zeros((6, 6, 3), np.uint8), np.zeros((6, 6, 4), np.uint8)]),
     "demos[1]"),
    (_broken("demo_captions", ["only one"]), "demo_captions"),
    (_broken("delta", float("nan")), "delta"),
    (_broken("seed", 1.5), "seed"),
    (_broken("extras", {"oracle": "high"}), "extras.oracle"),
    (_broken("admitted", True) | {"delta": LAM - 0.01}, "admitted"),  # breaks the threshold
    (_broken("colour", "red"), "colour"),
])
def test_bad_record_names_field_and_writes_nothing(tmp_path, record, field):
  writer = buffer_lib.BufferWriter(tmp_path)
  with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
    writer.commit_round(0, [record], {"threshold": LAM})
  assert writer.next_round() == 0 and not list(tmp_path.rglob("*.array_record"))


def test_corrupt_manifest_names_file(tmp_path):
  commit(tmp_path, 0)
  path = tmp_path / buffer_lib.MANIFEST
  for text in ("{not json", '{"rounds": [{"round": 5}]}', "[]"):
    path.write_text(text)
    for opener in (buffer_lib.BufferWriter, buffer_lib.BufferSource):
      with pytest.raises(buffer_lib.ManifestError, match=str(path)):
        opener(tmp_path)


def test_grain_batches_over_source(tmp_path):
  commit(tmp_path, 0, n=12)
  source = buffer_lib.BufferSource(tmp_path, threshold=-np.inf)
  source = pickle.loads(pickle.dumps(source))  # what grain's worker processes receive
  batch = grain.MapDataset.source(source).shuffle(seed=0).batch(4)[0]
  assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.uint8
  assert batch["demos"].shape == (4, 3, 6, 6, 3)
  assert batch["delta"].shape == (4,) and batch["extras"]["oracle"].shape == (4,)
  assert len(batch["demo_captions"]) == 3 and batch["prompt"].shape == (4,)
