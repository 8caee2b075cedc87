"""Stage `experts`: rounds, the delta-CLIP filter, the buffer on disk, kill and resume."""
import json
import math
import os

import numpy as np
import pytest

from experts import buffer as buffer_lib
from experts import parallel
from experts import stage
from suti import pretrain, scoring, train_lib
from suti.data import builder
from suti.data import pipeline
from tests.conftest import load_config


def _config():
  config = load_config("tiny")
  config.pretrain.num_steps = 10
  config.pretrain.sample_every = 1000
  config.experts.num_experts = 3   # 8 subjects: rounds of 3, 3 and 2
  config.experts.num_steps = 3
  config.experts.sample_steps = 4
  config.experts.prompts_per_subject = 2
  return config


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """Data, scoring models and a base model: what the experts stage reads."""
  config = _config()
  workdir = tmp_path_factory.mktemp("experts_base")
  builder.build(config, workdir / "data")
  scoring.run(config, workdir)
  pretrain.run(config, workdir)
  return workdir


def _workdir_from(base, path):
  path.mkdir()
  for name in ("data", "clip", "dino", "pretrain"):
    os.symlink(base / name, path / name)
  return path


def _all_records(workdir):
  return list(buffer_lib.BufferSource(stage.buffer_dir(workdir), threshold=-math.inf,
                                      identity_rule=False))


@pytest.fixture(scope="module")
def straight_run(base_workdir, tmp_path_factory):
  workdir = _workdir_from(base_workdir, tmp_path_factory.mktemp("straight") / "w")
  return workdir, stage.run(_config(), workdir)


def test_rounds_cover_every_subject_once_and_score_every_sample(straight_run):
  workdir, summary = straight_run
  config = _config()
  subjects = [c.subject_id for c in pipeline.ClusterSource(workdir / "data", "train")]
  manifest = buffer_lib.read_manifest(stage.buffer_dir(workdir))
  assert [len(r["subject_ids"]) for r in manifest["rounds"]] == [3, 3, 2]  # a smaller last one
  # Dequeued in dataset order, K at a time.
  assert [r["subject_ids"] for r in manifest["rounds"]] == [
      sorted(subjects[:3]), sorted(subjects[3:6]), sorted(subjects[6:])]
  records = _all_records(workdir)
  per_subject = config.experts.prompts_per_subject * config.experts.samples_per_prompt
  assert len(records) == summary["samples"] == len(subjects) * per_subject
  for r in records:  # every sample scored against its own subject's demos and prompt
    cluster = next(c for c in pipeline.ClusterSource(workdir / "data", "train")
                   if c.subject_id == r["subject_id"])
    assert r["prompt"] in cluster.prompts
    np.testing.assert_array_equal(r["demos"], np.stack(cluster.images))
    assert r["delta"] == pytest.approx(r["clip_target"] - r["clip_demos_max"], abs=1e-5)
    assert {"oracle_dino", "demo_dino", "oracle_clip_t"} <= set(r["extras"])
  assert summary["admitted"] == sum(bool(r["admitted"]) for r in records)


def test_the_filter_admits_exactly_delta_above_lambda(straight_run):
  workdir, summary = straight_run
  lam = _config().experts.delta_clip_threshold
  records = _all_records(workdir)
  deltas = np.array([r["delta"] for r in records])
  assert all(bool(r["admitted"]) == (r["delta"] > lam) for r in records)
  for r in buffer_lib.BufferSource(stage.buffer_dir(workdir)):
    assert r["delta"] > lam
  # Re-applying another lambda later needs no expert: the median splits the samples.
  median = float(np.median(deltas))
  again = buffer_lib.BufferSource(stage.buffer_dir(workdir), threshold=median)
  assert len(again) == int(np.sum(deltas > median)) > 0


def test_identity_filter_admits_faithful_samples_only(base_workdir, straight_run, tmp_path):
  """experts.min_demo_identity: the same samples and deltas, each scored for identity to its
  demos (the world judge's demo_dino, computed the same way), admitted only if it also passes
  the identity threshold; the rule is kept in the manifest and in a re-applied lambda."""
  straight = _all_records(straight_run[0])
  config = _config()
  config.experts.num_rounds = 2
  mu = float(np.median([r["extras"]["demo_dino"] for r in straight]))
  config.experts.min_demo_identity = mu
  config.experts.delta_clip_threshold = -0.3  # the tiny world's lambda (0.02) admits ~1 in 10
  workdir = _workdir_from(base_workdir, tmp_path / "w")
  summary = stage.run(config, workdir)
  key = lambda r: (r["subject_id"], r["prompt"], int(r["sample_index"]))
  records = sorted(_all_records(workdir), key=key)
  lam = config.experts.delta_clip_threshold
  straight = sorted((r for r in straight if r["round"] < 2), key=key)
  assert len(records) == len(straight)
  for a, b in zip(straight, records):
    assert (a["subject_id"], a["prompt"], a["delta"]) == (b["subject_id"], b["prompt"],
                                                           b["delta"])
  identities = np.array([r["extras"]["demo_identity"] for r in records])
  np.testing.assert_allclose(identities, [r["extras"]["demo_dino"] for r in records],
                             atol=1e-5)
  admitted = np.array([bool(r["admitted"]) for r in records])
  deltas = np.array([r["delta"] for r in records])
  np.testing.assert_array_equal(admitted, (deltas > lam) & (identities >= mu))
  assert 0 < admitted.sum() < (deltas > lam).sum()  # the identity rule drops some
  assert (deltas > lam).sum() < len(deltas)  # and so does lambda
  assert summary["admitted"] == admitted.sum() and summary["min_demo_identity"] == mu
  manifest = buffer_lib.read_manifest(stage.buffer_dir(workdir))
  assert all(r["info"]["min_demo_identity"] == mu for r in manifest["rounds"])
  again = buffer_lib.BufferSource(stage.buffer_dir(workdir), threshold=-math.inf)
  assert len(again) == int(np.sum(identities >= mu))


def test_round_artifacts_are_written(straight_run):
  workdir, summary = straight_run
  out = stage.stage_dir(workdir)
  assert sorted(p.name for p in (out / "grids").iterdir()) == [
      "round_000000.png", "round_000001.png", "round_000002.png"]
  logged = [m for m in train_lib.read_metrics(out / "logs") if "experts/acceptance_rate" in m]
  assert [m["step"] for m in logged] == [0, 1, 2]
  assert json.loads((out / "summary.json").read_text()) == summary
  assert stage.run(_config(), workdir) == summary  # complete: not run again


def test_kill_and_resume_writes_the_same_buffer(base_workdir, straight_run, tmp_path,
                                                monkeypatch):
  workdir = _workdir_from(base_workdir, tmp_path / "w")
  real = parallel.finetune_and_sample

  def dies_in_round_2(*args, **kwargs):
    if args[5] == 2:  # round_
      raise KeyboardInterrupt("killed")
    return real(*args, **kwargs)

  monkeypatch.setattr(parallel, "finetune_and_sample", dies_in_round_2)
  with pytest.raises(KeyboardInterrupt):
    stage.run(_config(), workdir)
  assert buffer_lib.BufferWriter(stage.buffer_dir(workdir)).next_round() == 2
  monkeypatch.setattr(parallel, "finetune_and_sample", real)
  summary = stage.run(_config(), workdir)
  straight = _all_records(straight_run[0])
  resumed = _all_records(workdir)
  assert len(resumed) == len(straight) == straight_run[1]["samples"]
  for a, b in zip(straight, resumed):
    assert a.keys() == b.keys()
    for key in a:
      if isinstance(a[key], np.ndarray):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
      else:
        assert a[key] == b[key], key
  assert summary["admitted"] == straight_run[1]["admitted"]


def test_plan_rounds_skips_and_counts_small_subjects():
  class C:  # the two fields plan_rounds reads
    def __init__(self, name, n):
      self.subject_id, self.images = name, [None] * n
  clusters = [C("a", 3), C("b", 2), C("c", 5), C("d", 4), C("e", 1)]
  rounds, skipped = stage.plan_rounds(clusters, num_experts=2, min_demos=3)
  assert rounds == [[0, 2], [3]] and skipped == ["b", "e"]
  assert stage.plan_rounds(clusters, 2, 3, num_rounds=1)[0] == [[0, 2]]


def test_a_failed_expert_is_dropped_and_the_others_are_kept(base_workdir):
  config = _config()
  clusters = list(pipeline.ClusterSource(base_workdir / "data", "train"))[:3]
  prompts = [stage.subject_prompts(c, 2) for c in clusters]
  images = np.random.default_rng(0).integers(0, 256, (3, 2, 16, 16, 3), np.uint8)
  clip = scoring.load_clip(config, base_workdir)
  records = stage.score_round(config, clip, None, clusters, prompts, images,
                              np.array([True, False, True]), 0, 0.02)
  assert [r["subject_id"] for r in records] == [clusters[i].subject_id for i in (0, 0, 2, 2)]
  assert [r["prompt"] for r in records] == prompts[0] + prompts[2]
  np.testing.assert_array_equal(records[2]["image"], images[2, 0])
  expected = clip.delta(images[[0, 0, 2, 2], [0, 1, 0, 1]],
                        [np.stack(clusters[i].images) for i in (0, 0, 2, 2)],
                        prompts[0] + prompts[2])["delta"]
  np.testing.assert_allclose([r["delta"] for r in records], expected, atol=1e-6)


_TWO_HOSTS = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from experts import stage
from tests.test_experts_stage import _config
summary = stage.run(_config(), sys.argv[3])
print("samples", summary["samples"], jax.process_count(), jax.device_count())
"""


def test_two_hosts_write_one_buffer_like_one_host(base_workdir, straight_run, tmp_path):
  # Two processes x 2 CPU devices, as a 2-host pod: samples are gathered across hosts and
  # process 0 alone commits. Same noise per expert as the 1-device run, so the same buffer
  # up to float rounding of the samples.
  import socket  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests.conftest import REPO, device_flags  # pylint: disable=import-outside-toplevel
  workdir = _workdir_from(base_workdir, tmp_path / "w")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    address = f"localhost:{s.getsockname()[1]}"
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_HOSTS, address, str(i), str(workdir)],
                            cwd=REPO, env=dict(os.environ, XLA_FLAGS=device_flags(2)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    assert f"samples {straight_run[1]['samples']} 2 4" in out
  straight, two_hosts = _all_records(straight_run[0]), _all_records(workdir)
  assert [(r["subject_id"], r["prompt"]) for r in two_hosts] == \
      [(r["subject_id"], r["prompt"]) for r in straight]
  for a, b in zip(straight, two_hosts):
    assert np.abs(a["image"].astype(int) - b["image"]).max() <= 2
    assert abs(a["delta"] - b["delta"]) < 0.02


def test_raising_num_rounds_continues_a_finished_run(base_workdir, straight_run, tmp_path):
  """A finished run is complete only for its own number of rounds: a config asking for more
  goes on from the committed buffer, and makes what an uninterrupted run makes."""
  workdir = _workdir_from(base_workdir, tmp_path / "w")
  config = _config()
  config.experts.num_rounds = 1
  assert stage.run(config, workdir)["rounds"] == 1
  assert stage.run(config, workdir)["rounds"] == 1  # complete for this config: skipped
  config.experts.num_rounds = 2
  summary = stage.run(config, workdir)
  assert summary["rounds"] == 2
  assert buffer_lib.BufferWriter(stage.buffer_dir(workdir)).next_round() == 2
  straight = [r for r in _all_records(straight_run[0]) if r["round"] < 2]
  continued = _all_records(workdir)
  assert summary["samples"] == len(continued) == len(straight)
  for a, b in zip(straight, continued):
    assert (a["subject_id"], a["prompt"], a["delta"]) == (b["subject_id"], b["prompt"],
                                                           b["delta"])
