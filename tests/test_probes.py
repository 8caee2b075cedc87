"""The hand-run probes whose numbers docs/RESULTS.md quotes: what they measure is what they say."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import probe_apprentice_x0  # noqa: E402  pylint: disable=wrong-import-position
import probe_oracle_targets  # noqa: E402  pylint: disable=wrong-import-position

from experts import buffer as buffer_lib  # noqa: E402  pylint: disable=wrong-import-position
from suti.data import world as world_lib  # noqa: E402  pylint: disable=wrong-import-position


def _records(world, subjects, round_index):
  """Expert-like samples: noise for the target, real demos and prompts of each subject."""
  rng = np.random.default_rng(round_index)
  records = []
  for i, subject in enumerate(subjects):
    cluster = world.cluster(subject, 3, 1)
    delta = float(rng.uniform(-0.2, 0.2))
    records.append({
        "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        "demos": list(cluster.images), "demo_captions": list(cluster.captions),
        "prompt": cluster.prompts[0], "subject_id": subject.subject_id,
        "delta": delta, "clip_target": 0.5 + delta, "clip_demos_max": 0.5,
        "seed": 100 * round_index + i, "sample_index": i % 2, "admitted": delta > 0,
        "extras": {}})
  return records


def test_oracle_buffer_replaces_only_the_targets_with_renders_of_their_prompts(tmp_path):
  world = world_lib.World(seed=0, image_size=16)
  subjects = world.subjects("train", 6)
  source, target = tmp_path / "experts", tmp_path / "oracle"
  writer = buffer_lib.BufferWriter(source)
  for round_index, chunk in enumerate((subjects[:4], subjects[4:])):
    writer.commit_round(round_index, _records(world, chunk, round_index), {"threshold": 0.0},
                        subject_ids=[f"skipped-{round_index}"])

  assert probe_oracle_targets.write_oracle_buffer(world, source, target) == 6

  before, after = buffer_lib.read_manifest(source), buffer_lib.read_manifest(target)
  for kind in buffer_lib.SETS:  # verdicts, deltas and skipped subjects as they were
    assert [r[kind]["deltas"] for r in after["rounds"]] == [
        r[kind]["deltas"] for r in before["rounds"]]
  assert [r["subject_ids"] for r in after["rounds"]] == [r["subject_ids"] for r in before["rounds"]]
  old = {(r["seed"], r["sample_index"]): r
         for r in buffer_lib.BufferSource(source, threshold=-np.inf)}
  new = list(buffer_lib.BufferSource(target, threshold=-np.inf))
  assert len(new) == 6
  by_id = {s.subject_id: s for s in subjects}
  for record in new:
    was = old[(record["seed"], record["sample_index"])]
    for field in ("prompt", "subject_id", "demo_captions", "delta", "admitted"):
      assert np.all(record[field] == was[field]), field
    np.testing.assert_array_equal(record["demos"], was["demos"])
    render, _ = world.render(by_id[record["subject_id"]], record["prompt"],
                             probe_oracle_targets.SEED_OFFSET + 16 * int(record["seed"])
                             + int(record["sample_index"]))
    np.testing.assert_array_equal(record["image"], render)
    assert not np.array_equal(record["image"], was["image"])


def test_oracle_buffer_refuses_a_subject_of_another_world(tmp_path):
  world = world_lib.World(seed=0, image_size=16)
  records = _records(world, world.subjects("train", 1), 0)
  records[0]["subject_id"] = "train-99999999"
  buffer_lib.BufferWriter(tmp_path / "experts").commit_round(0, records, {})
  with pytest.raises(ValueError, match="train-99999999"):
    probe_oracle_targets.write_oracle_buffer(world, tmp_path / "experts", tmp_path / "oracle")


@pytest.mark.parametrize("copy", [False, True])
def test_cluster_buffer_holds_every_subjects_prompts_with_exact_targets(tmp_path, copy):
  world = world_lib.World(seed=0, image_size=16)
  clusters = [world.cluster(s, 4, 2) for s in world.subjects("train", 3)]

  count = probe_oracle_targets.write_cluster_buffer(world, clusters, tmp_path / "b", copy=copy)

  records = list(buffer_lib.BufferSource(tmp_path / "b"))
  assert count == len(records) == 3 * 2 * 2  # subjects x unseen prompts x samples
  assert buffer_lib.read_manifest(tmp_path / "b")["rounds"][0]["subject_ids"] == [
      c.subject_id for c in clusters]
  by_id = {c.subject_id: c for c in clusters}
  targets = set()
  for record in records:
    cluster = by_id[record["subject_id"]]
    own = [np.asarray(x) for x in cluster.images]
    if copy:  # a cluster image with its caption; the demos are the other three
      i = [k for k, x in enumerate(own) if np.array_equal(x, record["image"])]
      assert len(i) == 1 and record["prompt"] == cluster.captions[i[0]]
      assert len(record["demos"]) == 3
      assert not any(np.array_equal(d, record["image"]) for d in record["demos"])
    else:  # the oracle's render of an unseen prompt, with every cluster image as a demo
      assert record["prompt"] in cluster.prompts
      render, _ = world.render(world_lib.Subject.from_json(cluster.spec), record["prompt"],
                               probe_oracle_targets.SEED_OFFSET + 16 * int(record["seed"])
                               + int(record["sample_index"]))
      np.testing.assert_array_equal(record["image"], render)
      assert len(record["demos"]) == 4
    targets.add(record["image"].tobytes())
  # copy: each of a cluster's 4 images is the target once; oracle: each render has its seed
  assert len(targets) == 12


def test_x0_demo_gain_is_zero_for_an_apprentice_that_ignores_its_demos():
  import jax  # pylint: disable=import-outside-toplevel
  from apprentice.model import Apprentice  # pylint: disable=import-outside-toplevel
  from suti import config_lib, train_lib  # pylint: disable=import-outside-toplevel
  from suti.model import TextToImage  # pylint: disable=import-outside-toplevel
  from tests.conftest import load_config  # pylint: disable=import-outside-toplevel
  config = config_lib.validate(load_config("tiny"))
  rng = np.random.default_rng(1)
  perturb = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), tree)
  base_params, frozen = TextToImage(config).init(jax.random.PRNGKey(0))
  model = Apprentice(config)
  fresh = model.init_from_base(perturb(base_params), jax.random.PRNGKey(2))
  world = world_lib.from_config(config)
  steps = (300, 850)
  targets, masks, x0 = probe_apprentice_x0.x0_estimates(model, fresh, frozen, world, 3, steps)
  assert targets.shape == (3, 16, 16, 3) and masks.any((1, 2)).all()
  assert x0.shape == (3, 2, 2, 16, 16, 3)
  # Zero-initialised demo layers: the same estimate whichever demos, so no gain at any t.
  np.testing.assert_allclose(x0[:, :, 0], x0[:, :, 1], atol=1e-5)
  assert probe_apprentice_x0.demo_gains(targets, masks, x0, steps) == {300: 0.0, 850: 0.0}
  # Demo layers that read the demos: the two estimates differ, and the gain is what the
  # errors on the subject's pixels say.
  targets, masks, x0 = probe_apprentice_x0.x0_estimates(model, perturb(fresh), frozen, world, 3,
                                                        steps)
  assert np.abs(x0[:, :, 0] - x0[:, :, 1]).max() > 1e-3
  truth = train_lib.to_model_space(targets)[:, None]
  errors = [[float(((x0[:, k, d] - truth[:, 0]) ** 2).mean(-1)[masks].sum()) for d in (0, 1)]
            for k in range(2)]
  expected = {t: round(100 * (1 - own / other), 2) for t, (own, other) in zip(steps, errors)}
  assert probe_apprentice_x0.demo_gains(targets, masks, x0, steps) == pytest.approx(
      expected, abs=0.02)
