"""The embedded subject world: deterministic, split-disjoint, and identity only in the pixels."""
import itertools
import re
import time

import numpy as np
import pytest

from suti.data import world
from suti.data.types import SubjectCluster
from suti.data.world import Scene, Subject, World
from tests.conftest import load_config


@pytest.fixture(scope="module")
def w32():
  return World(seed=0, image_size=32)


def _subject(**overrides):
  """A hand-made subject, so a test controls exactly which identity field differs."""
  fields = dict(subject_id="train-99999", split="train", category="box", pattern="stripes",
                colors=("navy", "lemon"), pattern_scale=0.62, pattern_angle=0, aspect=1.0,
                roundness=0.0, notch=-1, outline="none")
  return Subject(**{**fields, **overrides})


def _of_category(w, split, category, count):
  found = [s for s in w.subjects(split, count * len(world.CATEGORIES)) if s.category == category]
  assert len(found) == count
  return found


def _dilate(mask):
  grown = mask.copy()
  grown[1:] |= mask[:-1]
  grown[:-1] |= mask[1:]
  grown[:, 1:] |= mask[:, :-1]
  grown[:, :-1] |= mask[:, 1:]
  return grown


# --- subjects and splits ------------------------------------------------------------------------


def test_categories_and_backgrounds():
  required = {"ball", "box", "star", "ring", "heart", "fish", "house", "tree", "cup", "moon"}
  assert required <= set(world.CATEGORIES)
  assert len(set(world.CATEGORIES)) == len(world.CATEGORIES)
  assert len(set(world.BACKGROUNDS)) == len(world.BACKGROUNDS) >= 8


def test_subjects_are_deterministic_and_prefix_stable():
  a, b = World(seed=0), World(seed=0)
  assert a.subjects("train", 40) == b.subjects("train", 40)
  assert a.subjects("train", 40)[:7] == a.subjects("train", 7)
  assert a.subjects("train", 40) != World(seed=1).subjects("train", 40)
  assert a.subjects("eval", 0) == []
  # A start offset gives the same subjects as the longer prefix's tail (validation sets).
  assert a.subjects("eval", 5, start=3) == a.subjects("eval", 8)[3:]


def test_subjects_cover_categories_and_are_distinct(w32):
  subjects = w32.subjects("train", 3 * len(world.CATEGORIES))
  counts = {c: sum(s.category == c for s in subjects) for c in world.CATEGORIES}
  assert set(counts.values()) == {3}  # categories take turns
  assert len({s.identity() for s in subjects}) == len(subjects)
  assert len({s.coarse_key() for s in subjects}) == len(subjects)
  assert [s.subject_id for s in subjects[:3]] == ["train-00000", "train-00001", "train-00002"]
  assert all(s.split == "train" for s in subjects)


def test_splits_are_disjoint(w32):
  train = w32.subjects("train", 1500)
  held_out = w32.subjects("eval", 500)
  assert {s.identity() for s in train}.isdisjoint({s.identity() for s in held_out})
  # The guarantee is stronger: eval never shares even a coarse key with any train subject.
  assert {s.coarse_key() for s in train}.isdisjoint({s.coarse_key() for s in held_out})
  assert all(s.subject_id.startswith("eval-") and s.split == "eval" for s in held_out)


def test_subject_json_round_trips(w32):
  for s in w32.subjects("eval", 20):
    text = s.to_json()
    assert Subject.from_json(text) == s
    assert isinstance(Subject.from_json(text).colors, tuple)


# --- the caption grammar ------------------------------------------------------------------------


def _all_scenes():
  for background, color, accessory, style in itertools.product(
      world.BACKGROUNDS, (None, *world.COLORS), (None, *world.ACCESSORIES),
      (None, *world.STYLES)):
    yield Scene(background, color=color, accessory=accessory, style=style)


def test_parse_inverts_prompt_for_every_combination(w32):
  vocabulary = set(world.vocabulary())
  seen = set()
  for category in world.CATEGORIES:
    subject = _subject(category=category)
    for scene in _all_scenes():
      prompt = w32.prompt(subject, scene)
      assert w32.parse_prompt(prompt) == scene
      assert world.parse(prompt) == (category, scene)
      assert set(prompt.split()) <= vocabulary
      seen.add(prompt)
  assert len(seen) == len(world.CATEGORIES) * len(list(_all_scenes()))  # injective


def test_prompt_examples(w32):
  star = _subject(category="star")
  assert w32.prompt(star, Scene("grass")) == "a star on the grass"
  assert w32.prompt(star, Scene("snow", color="red")) == "a red star in the snow"
  assert w32.prompt(star, Scene("snow", color="orange")) == "an orange star in the snow"
  assert w32.prompt(star, Scene("beach", accessory="hat")) == "a star wearing a hat on the beach"
  assert w32.prompt(star, Scene("plain", style="sketch")) == "a sketch of a star"
  assert w32.prompt(star, Scene("night", style="pixel_art")) == "pixel art of a star at night"


@pytest.mark.parametrize("prompt", [
    "a star on the moon", "an star on the grass", "a orange star", "A star", "a star ",
    "a  star", "a dog", "a red", "a star wearing a hat wearing a scarf", "a sketch of",
    "a star on the grass on the beach", "", "a crimson star",
])
def test_parse_rejects_prompts_outside_the_grammar(w32, prompt):
  with pytest.raises(ValueError, match=re.escape(repr(prompt))):
    w32.parse_prompt(prompt)


def test_vocabulary_is_sorted_and_never_names_an_identity():
  vocabulary = world.vocabulary()
  assert vocabulary == sorted(set(vocabulary))
  assert {"a", "star", "red", "wearing", "sketch", "grass"} <= set(vocabulary)
  identity_words = set(world.PALETTE) | set(world.PATTERNS) | set(world.OUTLINES)
  assert identity_words.isdisjoint(vocabulary)


# --- rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32, 64])
def test_render_types_and_sizes(size):
  w = World(seed=3, image_size=size)
  subject = w.subjects("train", 1)[0]
  for scene in (Scene("grass"), Scene("city", color="blue", accessory="crown"),
                *(Scene("beach", style=style) for style in world.STYLES)):
    image, mask = w.render(subject, w.prompt(subject, scene), seed=5)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    assert mask.dtype == bool and mask.shape == (size, size)
    assert mask.any() and not mask.all()


def test_render_is_deterministic(w32):
  subject = w32.subjects("train", 1)[0]
  prompt = w32.prompt(subject, Scene("forest", style="painting"))
  image, mask = w32.render(subject, prompt, seed=11)
  again, mask_again = World(seed=0, image_size=32).render(subject, prompt, seed=11)
  assert image.tobytes() == again.tobytes() and np.array_equal(mask, mask_again)
  other, _ = w32.render(subject, prompt, seed=12)
  assert not np.array_equal(image, other)


def test_world_seed_changes_subjects_and_images():
  prompt_of = lambda w, s: w.prompt(s, Scene("grass"))  # noqa: E731
  a, b = World(seed=0), World(seed=1)
  images = [w.render(s, prompt_of(w, s), seed=0)[0] for w in (a, b) for s in w.subjects(
      "train", 1)]
  assert not np.array_equal(*images)


def test_each_background_is_distinct(w32):
  subject = _subject()
  images = {b: w32.render(subject, w32.prompt(subject, Scene(b)), seed=2)[0].astype(float)
            for b in world.BACKGROUNDS}
  for a, b in itertools.combinations(world.BACKGROUNDS, 2):
    assert np.abs(images[a] - images[b]).mean() > 10, (a, b)


def test_background_varies_with_seed(w32):
  subject = _subject()
  for background in world.BACKGROUNDS:
    prompt = w32.prompt(subject, Scene(background))
    (a, mask_a), (b, mask_b) = (w32.render(subject, prompt, seed) for seed in (1, 2))
    outside = ~_dilate(mask_a) & ~_dilate(mask_b)
    assert not np.array_equal(a[outside], b[outside]), background


def test_background_blur_smooths_the_scene_and_keeps_the_subject():
  sharp, soft = World(seed=0, image_size=16), World(seed=0, image_size=16, background_blur=1.5)
  subject = _subject()
  for background in ("brick", "water", "grass", "night"):
    prompt = sharp.prompt(subject, Scene(background))
    (a, mask_a), (b, mask_b) = (w.render(subject, prompt, seed=3) for w in (sharp, soft))
    np.testing.assert_array_equal(mask_a, mask_b)
    inner = mask_a & ~_dilate(~mask_a)  # the subject, away from its (blended) edge
    np.testing.assert_array_equal(a[inner], b[inner])
    outside = ~_dilate(_dilate(mask_a))
    a, b = a.astype(float), b.astype(float)
    def texture(x):
      return np.abs(np.diff(x, axis=1))[outside[:, 1:] & outside[:, :-1]].mean()
    assert texture(b) < 0.6 * texture(a), background
    assert np.abs(a[outside].mean(0) - b[outside].mean(0)).max() < 12, background  # colours
  assert world.from_config(_blurred_config()).render(subject, prompt, 3)[0].tobytes() == (
      soft.render(subject, prompt, 3)[0].tobytes())


def _blurred_config():
  config = load_config("tiny")
  config.image_size = 16
  config.data.world.background_blur = 1.5
  return config


def test_mask_area_and_extent_within_bounds(w32):
  for i, subject in enumerate(w32.subjects("train", 60)):
    scene = Scene(world.BACKGROUNDS[i % len(world.BACKGROUNDS)],
                  accessory=world.ACCESSORIES[i % 4] if i % 3 == 0 else None)
    _, mask = w32.render(subject, w32.prompt(subject, scene), seed=i)
    columns = np.nonzero(mask.any(0))[0]
    width = (columns[-1] - columns[0] + 1) / 32
    assert 0.03 < mask.mean() < 0.4, (subject, mask.mean())
    assert 0.18 <= width <= 0.75, (subject, width)


def test_same_category_subjects_differ_only_in_their_pixels(w32):
  for category in ("star", "cup", "house"):
    a, b = _of_category(w32, "train", category, 2)
    prompt = w32.prompt(a, Scene("beach"))
    (image_a, mask_a), (image_b, mask_b) = w32.render(a, prompt, 4), w32.render(b, prompt, 4)
    subject_pixels = _dilate(_dilate(mask_a | mask_b))
    # One seed, one layout and background: only the subject's pixels may differ.
    assert np.array_equal(image_a[~subject_pixels], image_b[~subject_pixels])
    difference = np.abs(image_a.astype(int) - image_b.astype(int))[mask_a & mask_b]
    assert difference.mean() > 20, category


@pytest.mark.parametrize("field,value", [
    ("pattern", "checker"), ("colors", ("navy", "lime")), ("colors", ("navy", "lemon", "lime")),
    ("pattern_scale", 0.85), ("pattern_angle", 45), ("aspect", 1.25), ("roundness", 0.36),
    ("notch", 2), ("outline", "cream"),
])
def test_every_identity_field_is_visible(w32, field, value):
  base, changed = _subject(), _subject(**{field: value})
  prompt = w32.prompt(base, Scene("grass"))
  image, mask = w32.render(base, prompt, seed=8)
  other, other_mask = w32.render(changed, prompt, seed=8)
  changed_pixels = np.abs(image.astype(int) - other.astype(int)).sum(-1) > 30
  assert changed_pixels[mask | other_mask].sum() >= 8, field


def test_recolour_keeps_pattern_and_background(w32):
  subject = _subject(pattern="stripes", colors=("navy", "lemon"))
  image, mask = w32.render(subject, w32.prompt(subject, Scene("snow")), seed=6)
  red, red_mask = w32.render(subject, w32.prompt(subject, Scene("snow", color="red")), seed=6)
  assert np.array_equal(mask, red_mask)
  assert np.array_equal(image[~_dilate(mask)], red[~_dilate(mask)])
  changed = np.abs(image.astype(int) - red.astype(int)).sum(-1) > 30
  assert changed[mask].mean() > 0.25  # the navy stripes turned red ...
  assert (~changed[mask]).mean() > 0.25  # ... and the lemon stripes stayed
  assert (red[changed & mask].astype(int)[:, 0] > 150).mean() > 0.6


def test_accessories_are_drawn_and_not_part_of_the_mask(w32):
  subject = _subject(category="ball")
  image, mask = w32.render(subject, w32.prompt(subject, Scene("plain")), seed=1)
  for accessory in world.ACCESSORIES:
    worn, worn_mask = w32.render(subject, w32.prompt(subject, Scene("plain", accessory=accessory)),
                                 seed=1)
    changed = np.abs(image.astype(int) - worn.astype(int)).sum(-1) > 30
    assert changed.sum() >= 6, accessory
    assert not (worn_mask & ~mask).any()  # an accessory never adds to the subject's pixels
    if accessory in ("hat", "crown"):  # worn on top: drawn above the subject
      assert changed[:np.nonzero(mask.any(1))[0][0]].any(), accessory


def test_styles_look_like_their_names(w32):
  subject = _subject(colors=("crimson", "lime"))
  sketch, sketch_mask = w32.render(subject, w32.prompt(subject, Scene("grass", style="sketch")), 3)
  spread = sketch.astype(int).max(-1) - sketch.astype(int).min(-1)
  assert spread.max() <= 16  # grey pencil on (faintly warm) paper
  assert np.median(sketch) > 200 and sketch.min() < 120  # mostly paper, some dark lines

  size = 32
  pixel, _ = w32.render(subject, w32.prompt(subject, Scene("grass", style="pixel_art")), 3)
  blocks = pixel.reshape(size // 2, 2, size // 2, 2, 3)
  assert (blocks == blocks[:, :1, :, :1]).all()  # chunky pixels
  assert set(np.unique(pixel)) <= {0, 64, 128, 191, 255}  # a small palette

  photo, _ = w32.render(subject, w32.prompt(subject, Scene("grass")), 3)
  painting, painting_mask = w32.render(subject, w32.prompt(subject, Scene("grass",
                                                                          style="painting")), 3)
  assert np.abs(photo.astype(int) - painting.astype(int)).mean() > 8
  assert abs(int(painting_mask.sum()) - int(sketch_mask.sum())) < 0.3 * sketch_mask.sum()


def test_render_refuses_a_prompt_for_another_category(w32):
  subject = _subject(category="star")
  with pytest.raises(ValueError, match="asks for a cup"):
    w32.render(subject, "a cup on the grass", seed=0)


def test_render_is_fast(w32):
  subject = w32.subjects("train", 1)[0]
  prompts = [w32.prompt(subject, Scene(b)) for b in world.BACKGROUNDS]
  w32.render(subject, prompts[0], 0)
  start = time.perf_counter()
  for i in range(3 * len(prompts)):
    w32.render(subject, prompts[i % len(prompts)], i)
  per_image = (time.perf_counter() - start) / (3 * len(prompts))
  assert per_image < 0.02  # ~2 ms on one CPU core; a per-pixel loop would take ~100x longer


# --- identity is recoverable from the images ---------------------------------------------------


def _features(image, mask):
  """Masked colour histogram, mean, std and edge density: a nearest-neighbour's view."""
  pixels = image[mask].astype(np.float32) / 255
  histogram = np.histogramdd(pixels, bins=(3, 3, 3), range=((0, 1),) * 3)[0].ravel()
  inner = mask[1:, 1:] & mask[:-1, 1:] & mask[1:, :-1]
  grey = image.astype(np.float32).mean(-1) / 255
  edges = np.abs(grey[1:, 1:] - grey[:-1, 1:]) + np.abs(grey[1:, 1:] - grey[1:, :-1])
  return np.concatenate([histogram / len(pixels), pixels.mean(0), pixels.std(0),
                         [edges[inner].mean() if inner.any() else 0.0]])


@pytest.mark.parametrize("size", [16, 32])
def test_identity_is_recoverable_from_demos(size):
  """Held-out renders match their own subject's demos among same-category subjects."""
  w = World(seed=0, image_size=size)
  correct = trials = 0
  for category in ("ball", "star", "house", "fish", "cup"):
    subjects = _of_category(w, "eval", category, 5)
    gallery = []
    for s in subjects:
      cluster = w.cluster(s, num_images=4, num_unseen_prompts=0)
      gallery.append(np.mean([_features(i, m) for i, m in zip(cluster.images, cluster.masks)], 0))
    for k, s in enumerate(subjects):
      for seed in (1001, 1002):
        background = world.BACKGROUNDS[(k + seed) % len(world.BACKGROUNDS)]
        image, mask = w.render(s, w.prompt(s, Scene(background)), seed)
        distances = [np.abs(_features(image, mask) - g).sum() for g in gallery]
        correct += int(np.argmin(distances) == k)
        trials += 1
  assert correct / trials > 0.6  # chance is 0.2


# --- clusters -----------------------------------------------------------------------------------


def test_cluster_contents(w32):
  subject = w32.subjects("train", 5)[4]
  cluster = w32.cluster(subject, num_images=5, num_unseen_prompts=6)
  assert isinstance(cluster, SubjectCluster)
  assert cluster.subject_id == subject.subject_id and cluster.class_name == subject.category
  assert Subject.from_json(cluster.spec) == subject
  assert len(cluster.images) == len(cluster.masks) == len(cluster.captions) == 5
  assert len(cluster.prompts) == len(set(cluster.prompts)) == 6
  # Demos are plain re-contextualizations in different places, captioned with no identity.
  demo_scenes = [w32.parse_prompt(c) for c in cluster.captions]
  assert all(s == Scene(s.background) for s in demo_scenes)
  assert len({s.background for s in demo_scenes}) == 5
  for caption in cluster.captions:
    assert subject.category in caption.split()
    assert not {*subject.colors, subject.pattern, subject.outline} & set(caption.split())
  # Unseen prompts: new, and each asks for a new place, a recolour, an accessory or a style.
  assert set(cluster.prompts).isdisjoint(cluster.captions)
  demo_backgrounds = {s.background for s in demo_scenes}
  for prompt in cluster.prompts:
    scene = w32.parse_prompt(prompt)
    assert (scene.color or scene.accessory or scene.style
            or scene.background not in demo_backgrounds), prompt
    w32.render(subject, prompt, seed=0)  # the oracle can draw every one
  # Each demo image is exactly the oracle's render of its caption.
  assert all(m.any() for m in cluster.masks)
  assert len({image.tobytes() for image in cluster.images}) == 5


def test_cluster_prompts_mix_the_skills(w32):
  skills = set()
  for subject in w32.subjects("train", 10):
    for prompt in w32.cluster(subject, 3, 4).prompts:
      scene = w32.parse_prompt(prompt)
      skills |= {name for name in ("color", "accessory", "style") if getattr(scene, name)}
  assert skills == {"color", "accessory", "style"}


def test_cluster_is_deterministic(w32):
  subject = w32.subjects("eval", 1)[0]
  a, b = w32.cluster(subject, 3, 2), World(seed=0, image_size=32).cluster(subject, 3, 2)
  assert a.captions == b.captions and a.prompts == b.prompts
  assert all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))
  c = w32.cluster(subject, 3, 2, seed=1)
  assert any(x.tobytes() != y.tobytes() for x, y in zip(a.images, c.images))


def test_clusters_draw_image_counts_in_range():
  w = World(seed=0, image_size=16)
  clusters = list(w.clusters("train", 12, min_images=2, max_images=4, num_unseen_prompts=2))
  counts = [len(c.images) for c in clusters]
  assert all(2 <= n <= 4 for n in counts) and len(set(counts)) > 1
  assert [c.subject_id for c in clusters] == [s.subject_id for s in w.subjects("train", 12)]
  again = [len(c.images) for c in w.clusters("train", 12, 2, 4, 2)]
  assert again == counts
  tail = list(w.clusters("train", 4, 2, 4, 2, start=8))
  assert [c.subject_id for c in tail] == [c.subject_id for c in clusters[8:]]
  assert [len(c.images) for c in tail] == counts[8:]
  for got, want in zip(tail, clusters[8:]):
    np.testing.assert_array_equal(got.images[0], want.images[0])


def test_from_config_uses_world_seed_and_image_size():
  config = load_config("tiny")
  w = world.from_config(config)
  assert (w.seed, w.image_size) == (config.data.world.seed, config.image_size)
  cluster = next(w.clusters("train", 1, config.data.world.min_images,
                            config.data.world.max_images, config.data.world.num_unseen_prompts))
  assert cluster.images[0].shape == (config.image_size, config.image_size, 3)


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=12), "image_size must be a multiple of 8"),
    (dict(image_size=0), "image_size must be a multiple of 8"),
    (dict(image_size=4), "got 4"),
    (dict(image_size=512), "got 512"),
    (dict(image_size="32"), "got '32'"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(background_blur=-1.0), "background_blur must be in [0, image_size / 4 = 8]"),
    (dict(background_blur=9), "got 9"),
])
def test_world_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    World(**kwargs)


def test_methods_reject_bad_arguments(w32):
  subject = w32.subjects("train", 1)[0]
  with pytest.raises(ValueError, match="unknown split 'test'"):
    w32.subjects("test", 3)
  with pytest.raises(ValueError, match="count must be an integer >= 0, got -1"):
    w32.subjects("train", -1)
  with pytest.raises(ValueError, match="exceeds the 'eval' split's capacity"):
    w32.subjects("eval", w32.capacity("eval") + 1)
  with pytest.raises(ValueError, match=r"start 1 \+ count .* exceeds the 'eval' split"):
    w32.subjects("eval", w32.capacity("eval"), start=1)
  with pytest.raises(ValueError, match="start must be an integer >= 0, got -1"):
    w32.subjects("eval", 1, start=-1)
  with pytest.raises(ValueError, match="num_images must be an integer >= 0, got -2"):
    w32.cluster(subject, -2, 1)
  with pytest.raises(ValueError, match="seed must be an integer >= 0, got -3"):
    w32.render(subject, w32.prompt(subject, Scene("grass")), seed=-3)
  # clusters() checks its arguments when called, before any cluster is rendered.
  with pytest.raises(ValueError, match=r"min_images \(5\) must be <= max_images \(3\)"):
    w32.clusters("train", 2, 5, 3, 1)
  with pytest.raises(ValueError, match="min_images must be an integer >= 1, got 0"):
    w32.clusters("train", 2, 0, 3, 1)
  with pytest.raises(ValueError, match="unknown split 'valid'"):
    w32.clusters("valid", 2, 3, 4, 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(background="moon"), "unknown background 'moon'"),
    (dict(background="grass", color="crimson"), "unknown color 'crimson'"),
    (dict(background="grass", accessory="cape"), "unknown accessory 'cape'"),
    (dict(background="grass", style="cubist"), "unknown style 'cubist'"),
])
def test_scene_rejects_unknown_values(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    Scene(**kwargs)


@pytest.mark.parametrize("field,value", [
    ("category", "dog"), ("split", "test"), ("pattern", "paisley"), ("colors", ("navy",)),
    ("colors", ("navy", "navy")), ("colors", ("navy", "red")), ("aspect", 3.0), ("notch", 9),
])
def test_subject_rejects_unknown_values(field, value):
  with pytest.raises(ValueError, match=field):
    _subject(**{field: value})
