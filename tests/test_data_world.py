"""The world dataset round trip: what the builder writes is exactly what the world rendered."""
import json

import numpy as np
import pytest

from suti import config_lib
from suti.data import builder, pipeline, world as world_lib
from tests.conftest import load_config


def test_world_dataset_round_trip(tmp_path):
  config = config_lib.validate(load_config("tiny"))
  summary = builder.build(config, tmp_path / "data")
  wc = config.data.world
  assert summary["splits"] == {"train": wc.num_train_subjects, "eval": wc.num_eval_subjects}
  assert summary["skipped_images"] == summary["skipped_subjects"] == 0

  world = world_lib.from_config(config)
  for split, count in summary["splits"].items():
    expected = {c.subject_id: c for c in world.clusters(split, count, wc.min_images,
                                                         wc.max_images, wc.num_unseen_prompts)}
    stored = {c.subject_id: c for c in pipeline.ClusterSource(tmp_path / "data", split)}
    assert stored.keys() == expected.keys()
    for subject_id, cluster in stored.items():
      want = expected[subject_id]
      assert cluster.class_name == want.class_name
      assert cluster.captions == want.captions and cluster.prompts == want.prompts
      assert len(cluster.images) == len(want.images)
      for got, ref in zip(cluster.images, want.images):
        np.testing.assert_array_equal(got, ref)  # PNG is lossless
      for got, ref in zip(cluster.masks, want.masks):
        np.testing.assert_array_equal(got, ref)
      # The oracle can render any prompt from the dataset alone, through the stored spec.
      subject = world_lib.Subject.from_json(cluster.spec)
      image, mask = world.render(subject, cluster.prompts[0], seed=0)
      assert image.shape == (config.image_size, config.image_size, 3) and mask.any()

  # Train and eval subjects are disjoint, also as stored.
  train_specs = {c.spec for c in pipeline.ClusterSource(tmp_path / "data", "train")}
  eval_specs = {c.spec for c in pipeline.ClusterSource(tmp_path / "data", "eval")}
  assert not {world_lib.Subject.from_json(s).identity() for s in train_specs} & \
      {world_lib.Subject.from_json(s).identity() for s in eval_specs}


def test_pairs_are_each_cluster_image_decoded_once(tmp_path, monkeypatch):
  config = config_lib.validate(load_config("tiny"))
  builder.build(config, tmp_path / "data")
  clusters = pipeline.ClusterSource(tmp_path / "data", "train")
  reads = []
  read = pipeline.ClusterSource.__getitem__
  monkeypatch.setattr(pipeline.ClusterSource, "__getitem__",
                      lambda self, i: reads.append(i) or read(self, i))
  pairs = pipeline.PairSource(clusters)
  expected = [(image, caption, s) for s in range(len(clusters))
              for image, caption in zip(read(clusters, s).images, read(clusters, s).captions)]
  assert len(pairs) == len(expected)
  for _ in range(2):  # every pair, twice, in a shuffled order
    for index in np.random.default_rng(0).permutation(len(pairs)):
      record = pairs[int(index)]
      image, caption, subject = expected[index]
      np.testing.assert_array_equal(record["image"], image)
      assert (record["caption"], record["subject"]) == (caption, subject)
  assert sorted(reads) == list(range(len(clusters)))  # each cluster decoded once
  # The decoded images are shared by every read, so no consumer may write into them.
  assert not pairs[0]["image"].flags.writeable


def test_first_eval_subject_gives_a_validation_set_disjoint_from_the_test_subjects(tmp_path):
  config = config_lib.validate(load_config("tiny"))
  config.data.world.num_train_subjects = 2
  config.data.world.num_eval_subjects = 3
  builder.build(config, tmp_path / "test")
  # A dataset built before the field existed (its fingerprint lacks it) is still reused.
  fingerprint = tmp_path / "test" / builder.FINGERPRINT_FILE
  stored = json.loads(fingerprint.read_text())
  del stored["data"]["world"]["first_eval_subject"]
  fingerprint.write_text(json.dumps(stored))
  assert builder.build(config, tmp_path / "test")["splits"]["eval"] == 3
  assert "first_eval_subject" not in fingerprint.read_text()  # reused, not rewritten
  config.data.world.first_eval_subject = 3
  builder.build(config, tmp_path / "validation")
  test = list(pipeline.ClusterSource(tmp_path / "test", "eval"))
  validation = list(pipeline.ClusterSource(tmp_path / "validation", "eval"))
  assert sorted(c.subject_id for c in test) == ["eval-00000", "eval-00001", "eval-00002"]
  assert sorted(c.subject_id for c in validation) == ["eval-00003", "eval-00004", "eval-00005"]
  # Another validation set is another dataset: the folder is not silently reused.
  config.data.world.first_eval_subject = 4
  with pytest.raises(builder.DatasetError, match="built from another data config"):
    builder.build(config, tmp_path / "validation")
  identities = lambda clusters: {world_lib.Subject.from_json(c.spec).identity() for c in clusters}
  assert not identities(test) & identities(validation)
  # The training subjects do not move.
  assert ([c.spec for c in pipeline.ClusterSource(tmp_path / "test", "train")]
          == [c.spec for c in pipeline.ClusterSource(tmp_path / "validation", "train")])
