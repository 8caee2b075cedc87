"""DreamBench-layout and generic-folder import, bad input, the CLI, and reading back with grain."""
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from suti import config_lib
from suti.data import builder, images, pipeline, sources

PROMPTS_AND_CLASSES = """Classes

subject_name,class
backpack,backpack
dog,dog
teapot,teapot
ghost,toy

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} on the beach'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def _photo(seed, shape=(48, 64, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_dreambench(root: pathlib.Path) -> pathlib.Path:
  """A small DreamBench-layout folder with every kind of bad input in it.

  backpack: 3 good jpgs + 1 corrupt file -> kept with 3 images, 1 skipped image.
  dog: 2 jpgs + grayscale, RGBA and palette PNGs -> kept with 5 images, live prompts.
  teapot: 2 images -> skipped (fewer than 3 demos). ghost: listed, no folder -> skipped.
  stray: a folder not in the table -> skipped.
  """
  dataset = root / "dataset"
  dataset.mkdir(parents=True)
  (dataset / "prompts_and_classes.txt").write_text(PROMPTS_AND_CLASSES)
  for name, count in [("backpack", 3), ("dog", 2), ("teapot", 2), ("stray", 3)]:
    (dataset / name).mkdir()
    for i in range(count):
      PIL.Image.fromarray(_photo(hash((name, i)) % 2**32)).save(dataset / name / f"{i:02d}.jpg")
  (dataset / "backpack" / "03.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
  PIL.Image.fromarray(_photo(7, (40, 40))).save(dataset / "dog" / "02.png")           # L
  PIL.Image.fromarray(_photo(8, (40, 30, 4))).save(dataset / "dog" / "03.png")        # RGBA
  PIL.Image.fromarray(_photo(9, (30, 40, 3))).convert("P").save(dataset / "dog" / "04.png")
  return dataset


def dreambench_config(path, image_size=16):
  config = config_lib.base_config()
  config.image_size = image_size
  config.model.channel_mult = (1,)
  config.model.attention_resolutions = config.model.cross_attention_resolutions = ()
  config.data.source = "dreambench"
  config.data.path = str(path)
  return config_lib.validate(config)


def test_parse_prompts_and_classes(tmp_path):
  table = sources.parse_prompts_and_classes(make_dreambench(tmp_path) / "prompts_and_classes.txt")
  assert table.classes == {"backpack": "backpack", "dog": "dog", "teapot": "teapot",
                           "ghost": "toy"}
  assert table.object_prompts == ["a {0} {1} in the jungle", "a {0} {1} on the beach",
                                  "a red {0} {1}"]
  assert table.live_prompts == ["a {0} {1} in the jungle", "a {0} {1} wearing a red hat"]


def test_dreambench_import_round_trip(tmp_path):
  dataset = make_dreambench(tmp_path)
  summary = builder.build(dreambench_config(dataset), tmp_path / "out")
  assert summary["subjects"] == 2 and summary["splits"] == {"eval": 2}
  assert summary["images"] == 3 + 5
  assert summary["skipped_images"] == 1
  assert summary["skipped"]["images"][0]["path"].endswith("backpack/03.jpg")
  assert {s["subject"] for s in summary["skipped"]["subjects"]} == {"teapot", "ghost", "stray"}
  assert summary["prompts"] == 3 + 2

  clusters = {c.subject_id: c for c in pipeline.ClusterSource(tmp_path / "out", "eval")}
  dog, backpack = clusters["dog"], clusters["backpack"]
  assert dog.class_name == "dog" and dog.captions == ["a dog"] * 5
  assert dog.prompts == ["a dog in the jungle", "a dog wearing a red hat"]       # live list
  assert backpack.prompts == ["a backpack in the jungle", "a backpack on the beach",
                              "a red backpack"]                                   # object list
  for image in dog.images + backpack.images:
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  # Images are stored losslessly: equal to the centre-cropped, resized originals.
  np.testing.assert_array_equal(backpack.images[0],
                                images.load_image(dataset / "backpack" / "00.jpg", 16))
  # The grayscale image became RGB with equal channels.
  gray = dog.images[2].astype(int)
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_unique_token_fills_prompts(tmp_path):
  config = dreambench_config(make_dreambench(tmp_path))
  config.data.unique_token = "sks"
  builder.build(config, tmp_path / "out")
  dog = [c for c in pipeline.ClusterSource(tmp_path / "out", "eval") if c.subject_id == "dog"][0]
  assert dog.prompts[0] == "a sks dog in the jungle" and dog.captions[0] == "a sks dog"


def test_center_crop_resize_keeps_the_middle(tmp_path):
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, 20:40] = 200  # the centred square
  PIL.Image.fromarray(wide).save(tmp_path / "wide.png")
  out = images.load_image(tmp_path / "wide.png", 10)
  assert out.shape == (10, 10, 3) and out.min() >= 190


def test_rgba_composited_on_white(tmp_path):
  transparent = np.zeros((8, 8, 4), np.uint8)
  PIL.Image.fromarray(transparent).save(tmp_path / "t.png")
  assert images.load_image(tmp_path / "t.png", 8).min() == 255


def test_folder_source_with_captions(tmp_path):
  root = tmp_path / "photos"
  for name in ("red_mug2", "plant"):
    (root / name).mkdir(parents=True)
    for i in range(3):
      PIL.Image.fromarray(_photo(i)).save(root / name / f"img{i}.png")
  (root / "red_mug2" / "captions.txt").write_text(
      "img0.png\ta red mug on a desk\nimg2.png\ta red mug in a kitchen\nbroken line\n")
  (root / "plant" / "class.txt").write_text("potted plant\n")
  (root / "plant" / "prompts.txt").write_text("a potted plant on the moon\n\n")
  (root / "plant" / "notes.md").write_text("not an image")
  config = dreambench_config(root)
  config.data.source = "folder"
  summary = builder.build(config, tmp_path / "out")
  assert summary["splits"] == {"train": 2} and summary["images"] == 6
  plant, mug = sorted(pipeline.ClusterSource(tmp_path / "out", "train"),
                      key=lambda c: c.subject_id)
  assert mug.subject_id == "red_mug2" and mug.class_name == "red mug"
  assert mug.captions == ["a red mug on a desk", "a red mug", "a red mug in a kitchen"]
  assert mug.prompts[0] == "a red mug in the jungle"
  assert plant.class_name == "potted plant" and plant.prompts == ["a potted plant on the moon"]


@pytest.mark.parametrize("setup,message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "has no prompts_and_classes.txt"),
    (lambda root: (root.mkdir(), (root / "prompts_and_classes.txt").write_text("hello\n")),
     "no 'subject_name,class' table"),
    (lambda root: (root.mkdir(), (root / "prompts_and_classes.txt").write_text(
        "subject_name,class\ndog\n")), "expected 'subject_name,class'"),
])
def test_dreambench_bad_folders(tmp_path, setup, message):
  root = tmp_path / "dataset"
  setup(root)
  with pytest.raises(sources.SourceError, match=message):
    builder.build(dreambench_config(root), tmp_path / "out")
  assert not (tmp_path / "out").exists()  # nothing written before the input was checked


def test_folder_source_empty_is_an_error(tmp_path):
  (tmp_path / "empty").mkdir()
  config = dreambench_config(tmp_path / "empty")
  config.data.source = "folder"
  with pytest.raises(sources.SourceError, match="has no subject folders"):
    builder.build(config, tmp_path / "out")


def test_all_subjects_skipped_is_an_error(tmp_path):
  root = tmp_path / "photos"
  (root / "a").mkdir(parents=True)
  (root / "a" / "x.jpg").write_bytes(b"garbage")
  config = dreambench_config(root)
  config.data.source = "folder"
  with pytest.raises(builder.DatasetError, match="no usable subject"):
    builder.build(config, tmp_path / "out")


def test_rebuild_reuses_and_refuses_other_config(tmp_path):
  config = dreambench_config(make_dreambench(tmp_path))
  first = builder.build(config, tmp_path / "out")
  info = pathlib.Path(first["path"]) / "dataset_info.json"
  stamp = info.stat().st_mtime_ns
  assert builder.build(config, tmp_path / "out") == first
  assert info.stat().st_mtime_ns == stamp  # reused, not rewritten
  config.data.min_demos = 2
  with pytest.raises(builder.DatasetError, match="another data config"):
    builder.build(config, tmp_path / "out")
  assert info.stat().st_mtime_ns == stamp  # the committed dataset is untouched


def test_pairs_and_resumable_iterator(tmp_path):
  builder.build(dreambench_config(make_dreambench(tmp_path)), tmp_path / "out")
  clusters = pipeline.ClusterSource(tmp_path / "out", "eval")
  pairs = pipeline.PairSource(clusters)
  assert len(pairs) == 8
  assert sorted(pairs[i]["caption"] for i in range(8)) == ["a backpack"] * 3 + ["a dog"] * 5

  def run(resume_after=None):
    it = pipeline.make_iterator(pairs, batch_size=3, seed=1,
                                random_transform=lambda r, rng: {
                                    "image": r["image"], "noise": rng.normal()})
    batches = [next(it) for _ in range(4)]
    if resume_after is None:
      return batches
    state = json.loads(json.dumps(batches and it.get_state()))
    fresh = pipeline.make_iterator(pairs, batch_size=3, seed=1,
                                   random_transform=lambda r, rng: {
                                       "image": r["image"], "noise": rng.normal()})
    fresh.set_state(state)
    return [next(fresh) for _ in range(3)], [next(it) for _ in range(3)]

  resumed, continued = run(resume_after=4)
  for a, b in zip(resumed, continued):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["noise"], b["noise"])
  with pytest.raises(builder.DatasetError, match="has no split 'train'"):
    pipeline.ClusterSource(tmp_path / "out", "train")


def test_iterator_reads_only_a_few_batches_ahead(tmp_path):
  """grain's default read options transform 500 records ahead on 16 threads: work training
  may never use, on threads that hold the GIL while the train step is traced."""
  builder.build(dreambench_config(make_dreambench(tmp_path)), tmp_path / "out")
  pairs = pipeline.PairSource(pipeline.ClusterSource(tmp_path / "out", "eval"))
  transformed = []
  it = pipeline.make_iterator(pairs, batch_size=2, seed=0, random_transform=lambda r, rng: (
      transformed.append(1), {"image": r["image"]})[1])
  next(it)
  time.sleep(1.0)  # let the prefetch threads run as far as they will
  assert 2 <= len(transformed) <= 2 * 8  # the batch taken, and a few batches ahead


def test_cli_prints_json_summary_last(tmp_path):
  dataset = make_dreambench(tmp_path)
  result = subprocess.run(
      [sys.executable, "-m", "suti.data", "--source=dreambench", f"--path={dataset}",
       f"--out={tmp_path / 'out'}", "--image_size=16"], capture_output=True, text=True,
      check=True)
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert {k: summary[k] for k in ("subjects", "images", "skipped_images", "skipped_subjects",
                                  "prompts")} == {"subjects": 2, "images": 8,
                                                  "skipped_images": 1, "skipped_subjects": 3,
                                                  "prompts": 5}
  assert "backpack/03.jpg" in result.stderr  # the warning names the skipped file

  missing = subprocess.run(
      [sys.executable, "-m", "suti.data", "--source=folder", f"--path={tmp_path / 'nope'}",
       f"--out={tmp_path / 'o2'}"], capture_output=True, text=True)
  assert missing.returncode == 2 and "does not exist" in missing.stderr
