"""The embedded subject world: procedural subjects, scenes, captions and an oracle renderer.

No photos can be downloaded, so every stage of SuTI runs on this world instead. A subject is a
category (a silhouette: 'star', 'cup', ...) plus an identity that no caption describes: its
texture (pattern, 2-3 colours, pattern scale and angle) and shape details (aspect ratio,
rounded corners, a notch, an outline). Captions come from a small fixed grammar that names
only the category and the scene, so a model can learn *which* star only from its images:

  [style of] a [colour] CATEGORY [wearing ACCESSORY] [BACKGROUND phrase]
  'a star on the grass', 'a red star in the snow', 'pixel art of a star at night'

The scene covers DreamBench's skills: re-contextualization (background), property
modification (recolours the subject's primary colour, keeping its pattern), accessorization
and art style. `World.render` is the oracle: it draws the true answer for any prompt in the
grammar, plus the subject's mask. Everything is seeded numpy, drawn at 4x supersampling and
box-downsampled, so the same seed gives byte-identical images.

Train and eval subjects are disjoint by construction: the coarse identity key (category,
pattern, primary colour, secondary colour) space is partitioned between the splits, so no
eval subject shares even that key with a training subject.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import zlib
from typing import Iterator

import numpy as np

from suti.data.types import SubjectCluster

SPLITS = ("train", "eval")
CATEGORIES = ("ball", "box", "star", "ring", "heart", "fish", "house", "tree", "cup", "moon",
              "bottle", "mushroom", "car", "flower", "kite")
BACKGROUNDS = ("plain", "grass", "snow", "beach", "night", "brick", "water", "desert", "forest",
               "city", "table")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
ACCESSORIES = ("hat", "scarf", "glasses", "crown")
STYLES = ("sketch", "pixel_art", "painting")
PATTERNS = ("stripes", "checker", "dots", "waves", "zigzag", "rings", "gradient", "plaid",
            "diamonds")

# Identity colours. Their names never occur in the caption grammar (see `vocabulary`).
PALETTE = {
    "crimson": (0.86, 0.12, 0.20), "tangerine": (1.00, 0.55, 0.10),
    "lemon": (0.98, 0.90, 0.20), "lime": (0.55, 0.85, 0.20), "teal": (0.05, 0.58, 0.55),
    "azure": (0.45, 0.75, 1.00), "navy": (0.12, 0.18, 0.55), "violet": (0.55, 0.30, 0.80),
    "magenta": (0.92, 0.30, 0.70), "chocolate": (0.45, 0.25, 0.12),
    "cream": (0.97, 0.93, 0.80), "charcoal": (0.15, 0.15, 0.17),
}
OUTLINES = ("none", "charcoal", "cream")
# Identity detail values; discrete so identities can be compared and partitioned exactly.
# Pattern periods are in the subject's local units (its width is ~2 units), i.e. 2.5-10 px at
# 32x32 depending on the subject's scale in the image.
PATTERN_SCALES = (0.45, 0.62, 0.85)
PATTERN_ANGLES = (0, 45, 90, 135)
ASPECTS = (0.8, 0.9, 1.0, 1.12, 1.25)
ROUNDNESSES = (0.0, 0.18, 0.36)
NOTCHES = (-1, 0, 1, 2, 3, 4, 5, 6, 7)  # -1: none, else the direction k * 45 degrees

_COLOR_RGB = {
    "red": (0.90, 0.10, 0.10), "orange": (1.00, 0.50, 0.00), "yellow": (1.00, 0.88, 0.10),
    "green": (0.15, 0.70, 0.20), "blue": (0.10, 0.30, 0.90), "purple": (0.50, 0.15, 0.70),
    "pink": (1.00, 0.55, 0.75), "white": (0.98, 0.98, 0.98),
}
_BACKGROUND_PHRASES = {
    "plain": "", "grass": "on the grass", "snow": "in the snow", "beach": "on the beach",
    "night": "at night", "brick": "in front of a brick wall", "water": "on the water",
    "desert": "in the desert", "forest": "in the forest", "city": "in the city",
    "table": "on a wooden table",
}
_ACCESSORY_PHRASES = {"hat": "wearing a hat", "scarf": "wearing a scarf",
                      "glasses": "wearing sunglasses", "crown": "wearing a crown"}
_STYLE_PHRASES = {"sketch": "a sketch of", "pixel_art": "pixel art of",
                  "painting": "a painting of"}

_SUPERSAMPLE = 4
_MIN_IMAGE_SIZE, _MAX_IMAGE_SIZE = 8, 256
_EVAL_SHARE = 5  # every 5th coarse identity key (per category) is held out for 'eval'
_MIN_PAIR_DISTANCE = 0.35  # RGB distance below which two colours make an invisible pattern


def _rgb(c) -> np.ndarray:
  return np.asarray(c, np.float32)


# ----------------------------------------------------------------------------------------------
# Subjects and scenes.


@dataclasses.dataclass(frozen=True)
class Subject:
  """One subject's identity. Nothing here but `category` ever reaches a caption."""
  subject_id: str
  split: str
  category: str
  pattern: str
  colors: tuple[str, ...]  # PALETTE names: primary, secondary[, third]
  pattern_scale: float
  pattern_angle: int
  aspect: float            # width / height stretch
  roundness: float         # corner rounding, in local units
  notch: int               # -1: none, else a bite out of the outline at k * 45 degrees
  outline: str             # 'none' or a PALETTE name

  def __post_init__(self):
    object.__setattr__(self, "colors", tuple(self.colors))
    allowed_values = {"split": SPLITS, "category": CATEGORIES, "pattern": PATTERNS,
                      "pattern_scale": PATTERN_SCALES, "pattern_angle": PATTERN_ANGLES,
                      "aspect": ASPECTS, "roundness": ROUNDNESSES, "notch": NOTCHES,
                      "outline": OUTLINES}
    for name, allowed in allowed_values.items():
      value = getattr(self, name)
      if value not in allowed:
        raise ValueError(f"subject {self.subject_id!r}: {name} must be one of {allowed}, "
                         f"got {value!r}")
    if not 2 <= len(self.colors) <= 3 or len(set(self.colors)) != len(self.colors) or any(
        c not in PALETTE for c in self.colors):
      raise ValueError(f"subject {self.subject_id!r}: colors must be 2-3 distinct names from "
                       f"{tuple(PALETTE)}, got {self.colors!r}")

  def identity(self) -> tuple:
    """Everything that makes this subject look like itself (not its id or split)."""
    return (self.category, self.pattern, self.colors, self.pattern_scale, self.pattern_angle,
            self.aspect, self.roundness, self.notch, self.outline)

  def coarse_key(self) -> tuple[str, str, str, str]:
    """The part of the identity the train/eval partition is made on."""
    return (self.category, self.pattern, self.colors[0], self.colors[1])

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Subject":
    return cls(**json.loads(text))


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a prompt asks for besides the category."""
  background: str
  color: str | None = None      # property modification: the new primary colour
  accessory: str | None = None  # accessorization
  style: str | None = None      # art style

  def __post_init__(self):
    if self.background not in BACKGROUNDS:
      raise ValueError(f"unknown background {self.background!r}; known: {BACKGROUNDS}")
    for name, value, allowed in (("color", self.color, COLORS),
                                 ("accessory", self.accessory, ACCESSORIES),
                                 ("style", self.style, STYLES)):
      if value is not None and value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; known: {allowed}")


# ----------------------------------------------------------------------------------------------
# The caption grammar.


def random_scene(rng: np.random.Generator) -> Scene:
  """A scene of the whole grammar: any background, each skill on independently (what the
  world CLIP and the base model are pre-trained on, as real ones are on the web's captions)."""
  pick = lambda options, p: str(rng.choice(options)) if rng.random() < p else None
  return Scene(str(rng.choice(BACKGROUNDS)), color=pick(COLORS, 0.4),
               accessory=pick(ACCESSORIES, 0.4), style=pick(STYLES, 0.3))


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def format_prompt(category: str, scene: Scene) -> str:
  """The grammar's one sentence for (category, scene)."""
  if category not in CATEGORIES:
    raise ValueError(f"unknown category {category!r}; known: {CATEGORIES}")
  noun = f"{scene.color} {category}" if scene.color else category
  words = [_article(noun), noun]
  if scene.accessory:
    words.append(_ACCESSORY_PHRASES[scene.accessory])
  if _BACKGROUND_PHRASES[scene.background]:
    words.append(_BACKGROUND_PHRASES[scene.background])
  if scene.style:
    words.insert(0, _STYLE_PHRASES[scene.style])
  return " ".join(words)


def _alternatives(phrases) -> str:
  return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True) if p)


_PROMPT_RE = re.compile(
    rf"(?:(?P<style>{_alternatives(_STYLE_PHRASES.values())}) )?(?:a|an) "
    rf"(?:(?P<color>{_alternatives(COLORS)}) )?(?P<category>{_alternatives(CATEGORIES)})"
    rf"(?: (?P<accessory>{_alternatives(_ACCESSORY_PHRASES.values())}))?"
    rf"(?: (?P<background>{_alternatives(_BACKGROUND_PHRASES.values())}))?")


def _invert(mapping: dict[str, str], phrase: str | None) -> str | None:
  return None if phrase is None else {v: k for k, v in mapping.items()}[phrase]


def parse(prompt: str) -> tuple[str, Scene]:
  """Inverse of `format_prompt`: (category, scene); ValueError if not in the grammar."""
  match = _PROMPT_RE.fullmatch(prompt)
  if match is None:
    raise ValueError(f"prompt {prompt!r} is not in the world's caption grammar")
  category = match["category"]
  scene = Scene(background=_invert(_BACKGROUND_PHRASES, match["background"] or ""),
                color=match["color"],
                accessory=_invert(_ACCESSORY_PHRASES, match["accessory"]),
                style=_invert(_STYLE_PHRASES, match["style"]))
  # The regex accepts a wrong article ('a orange'); only the grammar's exact sentence parses.
  if format_prompt(category, scene) != prompt:
    raise ValueError(f"prompt {prompt!r} is not in the world's caption grammar (did you mean "
                     f"{format_prompt(category, scene)!r}?)")
  return category, scene


def vocabulary() -> list[str]:
  """Every word the grammar can produce, sorted."""
  phrases = ["a", "an", *CATEGORIES, *COLORS, *_BACKGROUND_PHRASES.values(),
             *_ACCESSORY_PHRASES.values(), *_STYLE_PHRASES.values()]
  return sorted({word for phrase in phrases for word in phrase.split()})


# ----------------------------------------------------------------------------------------------
# Geometry: signed distances in the subject's local frame (x right, y down, body within
# [-1, 1]^2). Negative inside. Arrays broadcast: x is a row [1, W], y a column [H, 1].


def _circle(x, y, cx, cy, r):
  return np.hypot(x - cx, y - cy) - r


def _box(x, y, cx, cy, hw, hh, r=0.0):
  r = min(r, hw, hh)  # corner radius
  qx = np.abs(x - cx) - hw + r
  qy = np.abs(y - cy) - hh + r
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _ellipse(x, y, cx, cy, rx, ry):
  # Approximate distance; exact enough for inside tests and thin outlines.
  return (np.hypot((x - cx) / rx, (y - cy) / ry) - 1) * min(rx, ry)


def _polygon(x, y, vertices, r=0.0):
  """Convex polygon, exact: the distance to the nearest edge, negative inside.

  r > 0 rounds its corners with radius r at the same size: the polygon eroded by r (each edge
  moved in by r), inflated by r. r is capped so that small polygons keep their shape.
  """
  vs = np.asarray(vertices, np.float64)
  centre, following = vs.mean(0), np.roll(vs, -1, axis=0)
  edges = following - vs
  normals = np.stack([edges[:, 1], -edges[:, 0]], 1) / np.linalg.norm(edges, axis=1)[:, None]
  normals *= np.where(((centre - vs) * normals).sum(1) > 0, -1, 1)[:, None]  # outwards
  if r > 0:
    area = 0.5 * abs((vs[:, 0] * following[:, 1] - vs[:, 1] * following[:, 0]).sum())
    r = float(min(r, 2 * area / np.linalg.norm(edges, axis=1).sum() / 2))  # half the inradius
    before = np.roll(normals, 1, axis=0)  # the normal of the edge ending at each vertex
    vs = vs - r * (before + normals) / (1 + (before * normals).sum(1))[:, None]
    edges = np.roll(vs, -1, axis=0) - vs  # same directions, shorter
  inside, distance = None, None
  for (ax, ay), (ex, ey), (nx, ny) in zip(vs.tolist(), edges.tolist(), normals.tolist()):
    # Python floats, so float32 arrays stay float32.
    px, py = x - ax, y - ay
    side = nx * px + ny * py
    t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0, 1)
    to_edge = np.hypot(px - t * ex, py - t * ey)
    inside = side if inside is None else np.maximum(inside, side)
    distance = to_edge if distance is None else np.minimum(distance, to_edge)
  return np.where(inside < 0, -distance, distance) - r


def _star(x, y):
  # Inigo Quilez's five-pointed star (y up), centred on its bounding box.
  k1x, k1y, r, rf = 0.809016994, -0.587785252, 1.0, 0.5
  px, py = np.abs(x), 0.095 - y
  d = np.maximum(k1x * px + k1y * py, 0)
  px, py = px - 2 * d * k1x, py - 2 * d * k1y
  d = np.maximum(-k1x * px + k1y * py, 0)
  px, py = px + 2 * d * k1x, py - 2 * d * k1y
  px, py = np.abs(px), py - r
  bax, bay = -rf * k1y, rf * k1x - 1
  h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0, r)
  return np.hypot(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)


def _heart(x, y):
  # Inigo Quilez's heart (y up, tip at the origin), scaled to fill [-1, 1].
  k = 1.65
  px, py = np.abs(x) / k, 0.56 - y / k
  lobe = np.hypot(px - 0.25, py - 0.75) - 2**0.5 / 4
  t = 0.5 * np.maximum(px + py, 0)
  body = np.sqrt(np.minimum(px**2 + (py - 1)**2, (px - t)**2 + (py - t)**2)) * np.sign(px - py)
  return k * np.where(py + px > 1, lobe, body)


_DARK = (0.12, 0.11, 0.12)
_TRUNK = (0.42, 0.26, 0.12)
_IVORY = (0.95, 0.90, 0.78)
_GLASS = (0.75, 0.88, 0.96)


def _features(category, x, y):
  """Fixed parts drawn over the body (same for every subject of a category)."""
  if category == "fish":
    return [(_circle(x, y, -0.58, -0.12, 0.1), _DARK)]
  if category == "house":
    return [(_box(x, y, 0.0, 0.64, 0.17, 0.27), _DARK)]
  if category == "tree":
    return [(_box(x, y, 0.0, 0.73, 0.15, 0.24), _TRUNK)]
  if category == "bottle":
    return [(_box(x, y, 0.0, -0.86, 0.24, 0.11, 0.03), _DARK)]
  if category == "mushroom":
    return [(_box(x, y, 0.0, 0.52, 0.27, 0.42, 0.1), _IVORY)]
  if category == "car":
    wheels = np.minimum(_circle(x, y, -0.55, 0.5, 0.24), _circle(x, y, 0.55, 0.5, 0.24))
    hubs = np.minimum(_circle(x, y, -0.55, 0.5, 0.08), _circle(x, y, 0.55, 0.5, 0.08))
    return [(_box(x, y, -0.05, -0.22, 0.34, 0.14, 0.05), _GLASS), (wheels, _DARK),
            (hubs, (0.7, 0.7, 0.7))]
  if category == "flower":
    return [(_circle(x, y, 0.0, 0.0, 0.3), (0.55, 0.33, 0.08))]
  if category == "kite":
    return [(np.maximum(_box(x, y, 0.0, 0.0, 0.035, 0.95), _polygon(x, y, _KITE)), _DARK),
            (np.maximum(_box(x, y, 0.0, -0.2, 0.7, 0.035), _polygon(x, y, _KITE)), _DARK)]
  return []


_KITE = ((0.0, -0.95), (0.7, -0.2), (0.0, 0.95), (-0.7, -0.2))


def _scaled_round(sdf_fn, r, x, y):
  # Shrink, then inflate by r / 2: rounds the corners of a shape without holes or bites.
  r = r / 2
  k = 1 - r
  return k * sdf_fn(x / k, y / k) - r


def _body(category, x, y, r=0.0):
  """The category's patterned silhouette; `r` (the subject's roundness) rounds its corners.

  Shapes without corners use r otherwise: a thicker ring, a fuller moon, larger petals.
  """
  if category == "ball":
    return _circle(x, y, 0, 0, 0.95)
  if category == "box":
    return _box(x, y, 0, 0, 0.85, 0.85, r)
  if category == "star":
    return _scaled_round(_star, r, x, y)
  if category == "ring":
    return np.abs(np.hypot(x, y) - (0.68 - 0.1 * r)) - (0.26 + 0.1 * r)
  if category == "heart":
    return _scaled_round(_heart, r, x, y)
  if category == "fish":
    return np.minimum(_ellipse(x, y, -0.2, 0.0, 0.72, 0.52),
                      _polygon(x, y, ((0.35, 0.0), (0.95, -0.5), (0.95, 0.5)), r))
  if category == "house":
    return np.minimum(_box(x, y, 0.0, 0.42, 0.75, 0.5, r),
                      _polygon(x, y, ((-0.95, 0.0), (0.95, 0.0), (0.0, -0.92)), r))
  if category == "tree":
    return np.minimum(_polygon(x, y, ((0.0, -0.95), (-0.55, -0.1), (0.55, -0.1)), r),
                      _polygon(x, y, ((0.0, -0.55), (-0.8, 0.5), (0.8, 0.5)), r))
  if category == "cup":
    handle = np.maximum(np.abs(np.hypot(x - 0.58, y - 0.02) - 0.3) - 0.09, 0.5 - x)
    return np.minimum(_polygon(x, y, ((-0.62, -0.75), (0.62, -0.75), (0.48, 0.85),
                                      (-0.48, 0.85)), r), handle)
  if category == "moon":
    return np.maximum(_circle(x, y, 0, 0, 0.95),
                      -_circle(x, y, 0.45 + 0.5 * r, -0.3 - 0.2 * r, 0.78))
  if category == "bottle":
    return np.minimum(_box(x, y, 0.0, 0.35, 0.5, 0.6, 0.08 + 0.6 * r),
                      _box(x, y, 0.0, -0.5, 0.2, 0.45, 0.6 * r))
  if category == "mushroom":
    return _scaled_round(lambda x, y: np.maximum(_ellipse(x, y, 0.0, 0.12, 0.97, 0.92),
                                                 y - 0.12), r, x, y)
  if category == "car":
    return np.minimum(_box(x, y, 0.0, 0.2, 0.95, 0.3, 0.05 + r),
                      _box(x, y, -0.05, -0.22, 0.5, 0.26, 0.05 + r))
  if category == "flower":
    petals = [(0.58 * math.cos(a), 0.58 * math.sin(a)) for a in np.deg2rad(np.arange(5) * 72 - 90)]
    return functools.reduce(np.minimum, [_circle(x, y, px, py, 0.38 + 0.2 * r)
                                         for px, py in petals])
  if category == "kite":
    return _polygon(x, y, _KITE, r)
  raise ValueError(f"unknown category {category!r}")


# Where accessories sit, per category: (x of the head, top of the head, eye line, neck line).
_ANCHORS = {
    "ball": (0.0, -0.95, -0.2, 0.35), "box": (0.0, -0.85, -0.3, 0.3),
    "star": (0.0, -0.88, 0.0, 0.35), "ring": (0.0, -0.96, -0.66, 0.3),
    "heart": (0.0, -0.72, -0.2, 0.2), "fish": (-0.45, -0.46, -0.12, 0.1),
    "house": (0.0, -0.9, 0.22, 0.0), "tree": (0.0, -0.93, -0.05, 0.3),
    "cup": (0.0, -0.75, -0.25, 0.35), "moon": (-0.45, -0.84, -0.1, 0.45),
    "bottle": (0.0, -0.95, 0.3, -0.1), "mushroom": (0.0, -0.8, -0.35, 0.35),
    "car": (-0.05, -0.48, -0.22, 0.05), "flower": (0.0, -0.98, 0.0, 0.5),
    "kite": (0.0, -0.93, -0.2, 0.35),
}


def _notch_centre(category, roundness, notch) -> tuple[float, float]:
  """The outermost body point in the notch's direction, where the bite is taken."""
  angle = np.deg2rad(45 * notch)
  t = np.linspace(0, 1.6, 81)
  inside = _body(category, t * np.cos(angle), t * np.sin(angle), roundness) < 0
  r = t[np.nonzero(inside)[0].max()] if inside.any() else 0.9
  return float(r * np.cos(angle)), float(r * np.sin(angle))


def _accessory_parts(kind, x, y, category, body):
  hx, top, eye, neck = _ANCHORS[category]
  if kind == "hat":
    brim, crown = _box(x, y, hx, top - 0.03, 0.52, 0.07), _box(x, y, hx, top - 0.34, 0.33, 0.3)
    hat = np.minimum(brim, crown)
    return [(hat, _DARK), (_box(x, y, hx, top - 0.16, 0.33, 0.06), (0.85, 0.1, 0.12))]
  if kind == "crown":
    spikes = [_polygon(x, y, ((hx + dx - 0.15, top - 0.2), (hx + dx + 0.15, top - 0.2),
                              (hx + dx, top - 0.62))) for dx in (-0.3, 0.0, 0.3)]
    crown = functools.reduce(np.minimum, spikes, _box(x, y, hx, top - 0.1, 0.43, 0.13))
    return [(crown, (0.98, 0.78, 0.15))]
  if kind == "glasses":
    lenses = np.minimum(_circle(x, y, hx - 0.3, eye, 0.24), _circle(x, y, hx + 0.3, eye, 0.24))
    return [(np.minimum(lenses, _box(x, y, hx, eye - 0.04, 0.12, 0.04)), (0.05, 0.05, 0.08))]
  if kind == "scarf":
    band = np.maximum(np.abs(y - neck) - 0.13, body - 0.08)
    tail = _box(x, y, hx + 0.3, neck + 0.3, 0.11, 0.24, 0.03)
    return [(np.minimum(band, tail), (0.88, 0.1, 0.15)),
            (np.maximum(np.minimum(band, tail), np.abs(y - neck - 0.42) - 0.04), _IVORY)]
  raise ValueError(f"unknown accessory {kind!r}")


# ----------------------------------------------------------------------------------------------
# Texture: a pattern gives every pixel a level in [0, n_colors - 1]; levels map to colours.


def _pattern_level(subject, x, y, n):
  angle = math.radians(subject.pattern_angle)
  cos, sin = math.cos(angle), math.sin(angle)  # Python floats keep float32 arrays float32
  a = x * cos + y * sin
  b = y * cos - x * sin
  p = subject.pattern_scale

  def stripes(s):  # colour bands of width p / 2, cycling through the colours
    return np.floor(s / (p / 2)) % n

  if subject.pattern == "stripes":
    return stripes(a)
  if subject.pattern == "checker":
    return (np.floor(a / (p / 2)) + np.floor(b / (p / 2))) % n
  if subject.pattern == "waves":
    return stripes(a + 0.25 * p * np.sin(2 * np.pi * b / p))
  if subject.pattern == "zigzag":
    return stripes(a + 0.5 * p * np.abs(b / p - np.floor(b / p + 0.5)) * 2)
  if subject.pattern == "rings":
    return stripes(np.hypot(x - 0.3 * cos, y - 0.3 * sin))
  if subject.pattern == "gradient":
    return np.clip((a + 0.9) / 1.8, 0, 1) * (n - 1)
  # Motifs on a p-spaced grid; with three colours, alternate rows take the third.
  fa, fb = a / p - np.round(a / p), b / p - np.round(b / p)
  row_colour = 1 + np.round(b / p) % (n - 1)
  if subject.pattern == "dots":
    return np.where(fa**2 + fb**2 < 0.3**2, row_colour, 0)
  if subject.pattern == "diamonds":
    return np.where(np.abs(fa) + np.abs(fb) < 0.33, row_colour, 0)
  if subject.pattern == "plaid":
    across, along = np.abs(fa) < 0.17, np.abs(fb) < 0.17
    crossing = 1.5 if n == 3 else 1.0  # where the two bands cross, their colours mix
    return np.where(across & along, crossing, np.where(across, 1, np.where(along, n - 1, 0)))
  raise ValueError(f"unknown pattern {subject.pattern!r}")


def _colorize(level, colors):
  """Palette lookup: level 0 -> colors[0], 1 -> colors[1], ...; fractions blend neighbours."""
  i0 = np.floor(level).astype(np.int32)
  t = level - i0
  if not t.any():  # a hard-edged pattern: one gather is enough
    return colors[i0]
  i0 = np.minimum(i0, len(colors) - 2)
  t = (level - i0)[..., None]
  return colors[i0] * (1 - t) + colors[i0 + 1] * t


# ----------------------------------------------------------------------------------------------
# Backgrounds: f(u, v, rng, out_size) -> [H, W, 3] floats in [0, 1], u a row and v a column
# of supersampled pixel centres in [0, 1].


@functools.lru_cache(maxsize=None)
def _interp_weights(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
  """Linear interpolation from cells + 1 grid points to `size` pixel centres: (index, weight)."""
  t = (np.arange(size) + 0.5) / size * cells
  i = np.minimum(np.floor(t).astype(np.int64), cells - 1)
  return i, (t - i).astype(np.float32)


def _noise1d(rng, size, cells):
  """Smooth random values in [0, 1] along one axis: a random grid, linearly interpolated."""
  grid = rng.random(cells + 1, dtype=np.float32)
  i, w = _interp_weights(size, cells)
  return grid[i] * (1 - w) + grid[i + 1] * w


def _noise2d(rng, size, cells):
  # Gathers, not matmuls: BLAS threads contend badly when many renderers share a machine.
  grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
  i, w = _interp_weights(size, cells)
  rows = grid[i] * (1 - w)[:, None] + grid[i + 1] * w[:, None]
  return rows[:, i] * (1 - w) + rows[:, i + 1] * w


def _sparkles(rng, size, out_size, density):
  """[size, size] with random single output pixels set to 1 (stars, snowflakes)."""
  count = max(1, int(density * out_size * out_size))
  low = np.zeros((out_size, out_size), np.float32)
  low[rng.integers(0, out_size, count), rng.integers(0, out_size, count)] = 1
  f = size // out_size
  return np.repeat(np.repeat(low, f, 0), f, 1)


def _vgrad(v, top, bottom, v0=0.0, v1=1.0):
  t = np.clip((v - v0) / (v1 - v0), 0, 1)[..., None]
  return _rgb(top) * (1 - t) + _rgb(bottom) * t


def _wave(u, rng, amplitude, cycles):
  return amplitude * np.sin(2 * np.pi * (cycles * u + rng.random()))


def _over(img, mask, colour):
  """`img` with `colour` ([3] or an image) painted where `mask` is true; all broadcast."""
  colour = np.asarray(colour, np.float32)
  if colour.ndim > 1:
    return np.where(mask[..., None], colour, img)
  # A constant colour: a copy plus an indexed write is ~2x faster than np.where.
  shape = np.broadcast_shapes(img.shape[:-1], mask.shape)
  out = np.array(np.broadcast_to(img, shape + (3,)))
  out[np.broadcast_to(mask, shape)] = colour
  return out


def _bg_plain(u, v, rng, s):
  tint = rng.uniform(-0.03, 0.03, 3)
  return _vgrad(v, 0.92 + tint, 0.74 + tint) + 0 * u[..., None]


def _bg_grass(u, v, rng, s):
  h = rng.uniform(0.22, 0.38) + _wave(u, rng, 0.02, 1.0)
  sky = _vgrad(v, (0.45, 0.68, 0.95), (0.78, 0.88, 0.98), 0, 0.4)
  blades = _noise1d(rng, u.shape[-1], 2 * s // 3)[None, :]
  shade = 0.65 + 0.3 * blades + 0.25 * _noise2d(rng, u.shape[-1], 4) + 0.2 * (v - h)
  return _over(sky, v >= h, _rgb((0.28, 0.6, 0.18)) * shade[..., None])


def _bg_snow(u, v, rng, s):
  h = rng.uniform(0.28, 0.42) + _wave(u, rng, 0.03, 1.3)
  img = _vgrad(v, (0.55, 0.62, 0.75), (0.82, 0.85, 0.9), 0, 0.45)
  drifts = _noise2d(rng, u.shape[-1], 3)[..., None]
  img = _over(img, v >= h, _rgb((0.97, 0.98, 1.0)) - _rgb((0.16, 0.12, 0.05)) * drifts)
  flakes = _sparkles(rng, u.shape[-1], s, 0.03)[..., None]
  return img * (1 - flakes) + flakes


def _bg_beach(u, v, rng, s):
  horizon = rng.uniform(0.22, 0.34)
  shore = horizon + rng.uniform(0.12, 0.2) + _wave(u, rng, 0.025, 1.5)
  img = _vgrad(v, (0.35, 0.65, 0.98), (0.7, 0.88, 1.0), 0, horizon)
  img = _over(img, v >= horizon, _vgrad(v, (0.05, 0.4, 0.7), (0.15, 0.6, 0.8), horizon, shore))
  grain = 0.9 + 0.1 * _noise2d(rng, u.shape[-1], s // 2)[..., None]
  img = _over(img, v >= shore, _rgb((0.95, 0.85, 0.6)) * grain)
  return _over(img, np.abs(v - shore) < 0.012, _rgb((1.0, 1.0, 1.0)))


def _bg_night(u, v, rng, s):
  img = _vgrad(v, (0.01, 0.02, 0.1), (0.12, 0.1, 0.3))
  stars = _sparkles(rng, u.shape[-1], s, 0.025)[..., None]
  img = img * (1 - stars) + _rgb((1.0, 0.95, 0.7)) * stars
  hills = v > rng.uniform(0.82, 0.9) + _wave(u, rng, 0.04, 0.8)
  return _over(img, hills, _rgb((0.03, 0.05, 0.08)))


def _bg_brick(u, v, rng, s):
  height = rng.uniform(0.09, 0.13)
  width = 2.2 * height
  row = np.floor(v / height + rng.random())
  shifted = u / width + 0.5 * (row % 2) + rng.random()
  col = np.floor(shifted)
  mortar = ((v / height + 1) % 1 < 0.14) | (shifted % 1 < 0.07)
  tones = 0.82 + 0.3 * rng.random((8, 8), dtype=np.float32)
  brick = _rgb((0.68, 0.26, 0.18)) * tones[(row % 8).astype(int), (col % 8).astype(int)][..., None]
  return _over(brick, mortar, _rgb((0.78, 0.75, 0.7)))


def _bg_water(u, v, rng, s):
  img = _vgrad(v, (0.15, 0.45, 0.78), (0.03, 0.2, 0.5))
  crest = np.sin(2 * np.pi * (rng.uniform(7, 10) * v + _wave(u, rng, 0.35, 1.7)))
  img = _over(img, crest > 0.82, _rgb((0.55, 0.8, 0.95)))
  return img * (0.92 + 0.16 * _noise2d(rng, u.shape[-1], 3))[..., None]


def _bg_desert(u, v, rng, s):
  img = _vgrad(v, (0.98, 0.72, 0.42), (1.0, 0.92, 0.72), 0, 0.5)
  sun = _circle(u, v, rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.22), 0.08) < 0
  img = _over(img, sun, _rgb((1.0, 0.98, 0.85)))
  far = v >= rng.uniform(0.4, 0.5) + _wave(u, rng, 0.06, 1.1)
  img = _over(img, far, _rgb((0.9, 0.64, 0.34)))
  near = v >= rng.uniform(0.66, 0.74) + _wave(u, rng, 0.05, 0.7)
  return _over(img, near, _rgb((0.8, 0.5, 0.25)))


def _bg_forest(u, v, rng, s):
  leaves = _noise2d(rng, u.shape[-1], max(4, s // 4))[..., None]
  img = _rgb((0.06, 0.22, 0.09)) + _rgb((0.1, 0.22, 0.08)) * leaves + 0 * v[..., None]
  for x0 in rng.uniform(0, 1, rng.integers(4, 7)):
    trunk = (np.abs(u - x0) < rng.uniform(0.02, 0.04)) & (v > rng.uniform(0.0, 0.4))
    img = _over(img, trunk, _rgb((0.3, 0.2, 0.12)) * rng.uniform(0.8, 1.1))
  ground = v >= rng.uniform(0.8, 0.86) + _wave(u, rng, 0.02, 2.0)
  return _over(img, ground, _rgb((0.3, 0.23, 0.13)))


def _bg_city(u, v, rng, s):
  img = _vgrad(v, (0.35, 0.3, 0.6), (0.98, 0.62, 0.45), 0, 0.7)
  n = int(rng.integers(5, 9))
  edges = np.cumsum(rng.uniform(0.6, 1.4, n))
  building = np.minimum(np.searchsorted(edges / edges[-1], u[0], side="right"), n - 1)
  tops = (1 - rng.uniform(0.35, 0.8, n).astype(np.float32))[building][None, :]
  tone = rng.uniform(0.75, 1.05, n).astype(np.float32)[building][None, :, None]
  wu, wv = u * rng.uniform(11, 14), v * rng.uniform(12, 16)
  lit = rng.random((16, 16)) < 0.55
  window = ((wu % 1 > 0.35) & (wu % 1 < 0.8) & (wv % 1 > 0.3) & (wv % 1 < 0.75)
            & lit[wv.astype(int) % 16, wu.astype(int) % 16] & (v > tops + 0.03))
  img = _over(img, v >= tops, _rgb((0.25, 0.27, 0.36)) * tone)
  return _over(img, window, _rgb((1.0, 0.86, 0.4)))


def _bg_table(u, v, rng, s):
  edge = rng.uniform(0.45, 0.58)
  img = _vgrad(v, (0.93, 0.88, 0.78), (0.82, 0.76, 0.66), 0, edge) + 0 * u[..., None]
  grain = np.sin(2 * np.pi * (30 * v + 2 * _noise1d(rng, u.shape[-1], 6)[None, :]))
  wood = _rgb((0.62, 0.4, 0.22)) * (0.9 + 0.08 * grain)[..., None]
  seam = ((v - edge) / rng.uniform(0.12, 0.18)) % 1 < 0.06
  img = _over(img, v >= edge, wood)
  img = _over(img, (v >= edge) & seam, _rgb((0.4, 0.25, 0.13)))
  return _over(img, np.abs(v - edge - 0.01) < 0.012, _rgb((0.45, 0.28, 0.14)))


_BACKGROUND_FNS = {
    "plain": _bg_plain, "grass": _bg_grass, "snow": _bg_snow, "beach": _bg_beach,
    "night": _bg_night, "brick": _bg_brick, "water": _bg_water, "desert": _bg_desert,
    "forest": _bg_forest, "city": _bg_city, "table": _bg_table,
}
assert tuple(_BACKGROUND_FNS) == BACKGROUNDS == tuple(_BACKGROUND_PHRASES)


# ----------------------------------------------------------------------------------------------
# Art styles, applied to the supersampled image (sketch, painting) or the final one (pixel art).

def _sketch(img, f):
  """Pencil on paper: dark lines where colours change over one output pixel, light shading."""
  around = (f // 2, f - f // 2)
  dy = np.pad(np.abs(img[f:] - img[:-f]).sum(-1, keepdims=True), (around, (0, 0), (0, 0)),
              mode="edge")
  dx = np.pad(np.abs(img[:, f:] - img[:, :-f]).sum(-1, keepdims=True), ((0, 0), around, (0, 0)),
              mode="edge")
  line = np.clip(1.6 * (dx + dy) - 0.1, 0, 1)
  luminance = img @ _rgb((0.3, 0.59, 0.11))[:, None]
  grey = (0.97 - 0.12 * (1 - luminance)) * (1 - 0.85 * line)
  return grey * _rgb((1.0, 0.98, 0.94))


def _painting(img, coverage, rng, f):
  """Wobbly brush strokes, posterized saturated colour, canvas weave."""
  size = img.shape[0]
  shift = np.rint(f * (_noise2d(rng, size, 5) - 0.5)).astype(np.int32)  # about +-half a pixel
  rows = np.clip(np.arange(size)[:, None] + shift, 0, size - 1)
  cols = np.clip(np.arange(size)[None, :] + shift.T, 0, size - 1)
  img, coverage = img[rows, cols], coverage[rows, cols]
  stroke = (2 * img + np.roll(img, f // 2, axis=(0, 1)) + np.roll(img, -f // 2, axis=(0, 1))) / 4
  mean = stroke.mean(-1, keepdims=True)
  vivid = np.clip(mean + 1.4 * (stroke - mean), 0, 1)
  posterized = np.round(vivid * 5) / 5
  weave = 0.88 + 0.12 * _noise2d(rng, size, size // f)[..., None]
  return posterized * weave * _rgb((1.0, 0.96, 0.88)), coverage


def _pixel_art(img, coverage):
  """Chunky pixels (16 across), saturated, in a 125-colour palette (5 levels per channel)."""
  size = img.shape[0]
  block = max(1, size // 16)
  n = size // block
  img = img.reshape(n, block, n, block, 3).mean((1, 3))
  coverage = coverage.reshape(n, block, n, block).mean((1, 3))
  mean = img.mean(-1, keepdims=True)
  img = np.round(np.clip(mean + 1.2 * (img - mean), 0, 1) * 4) / 4
  return (np.repeat(np.repeat(img, block, 0), block, 1),
          np.repeat(np.repeat(coverage, block, 0), block, 1))


# ----------------------------------------------------------------------------------------------
# The world.


def _downsample(img, f):
  """Box filter by f along both axes (faster than reshape + mean)."""
  rows = img[0::f].copy()
  for i in range(1, f):
    rows += img[i::f]
  out = rows[:, 0::f].copy()
  for i in range(1, f):
    out += rows[:, i::f]
  return out * (1 / (f * f))


def _blur(img, radius: int):
  """Two passes of a (2 * radius + 1)-wide box filter on both axes (~ a Gaussian), edges held."""
  for axis in (0, 1, 0, 1):
    padded = np.pad(img, [(radius + 1, radius) if a == axis else (0, 0) for a in range(3)],
                    mode="edge")
    summed = np.cumsum(padded, axis=axis, dtype=np.float32)
    hi = np.take(summed, np.arange(2 * radius + 1, summed.shape[axis]), axis=axis)
    lo = np.take(summed, np.arange(0, summed.shape[axis] - 2 * radius - 1), axis=axis)
    img = (hi - lo) / (2 * radius + 1)
  return img


def _check_count(name, value, minimum=0):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _seed_of(*parts) -> int:
  """A stable 31-bit seed from ints and strings (Python's hash() is salted per process)."""
  words = [p if isinstance(p, (int, np.integer)) else zlib.crc32(str(p).encode()) for p in parts]
  return int(np.random.default_rng([int(w) for w in words]).integers(2**31))


@functools.lru_cache(maxsize=None)
def _color_pairs() -> tuple[tuple[str, str], ...]:
  names = list(PALETTE)
  return tuple((a, b) for a, b in itertools.permutations(names, 2)
               if np.linalg.norm(_rgb(PALETTE[a]) - _rgb(PALETTE[b])) >= _MIN_PAIR_DISTANCE)


class World:
  """Deterministic subjects, captions and renders for one world seed and image size."""

  def __init__(self, seed: int = 0, image_size: int = 32, background_blur: float = 0.0):
    """background_blur: blurs the scene (not the subject) by about this many output pixels,
    which leaves each scene its colours and horizon but no fine texture: an easier world for
    a small base model (configs/demo.py)."""
    _check_count("seed", seed)
    if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
        or not _MIN_IMAGE_SIZE <= image_size <= _MAX_IMAGE_SIZE or image_size % 8):
      raise ValueError(f"image_size must be a multiple of 8 in [{_MIN_IMAGE_SIZE}, "
                       f"{_MAX_IMAGE_SIZE}], got {image_size!r}")
    if (isinstance(background_blur, bool) or not isinstance(background_blur, (int, float))
        or not 0 <= background_blur <= image_size / 4):
      raise ValueError(f"background_blur must be in [0, image_size / 4 = {image_size / 4:g}] "
                       f"output pixels, got {background_blur!r}")
    self.seed = int(seed)
    self.image_size = int(image_size)
    self._blur_radius = int(round(background_blur * _SUPERSAMPLE))
    hi = self.image_size * _SUPERSAMPLE
    centres = ((np.arange(hi) + 0.5) / hi).astype(np.float32)
    self._u, self._v = centres[None, :], centres[:, None]
    self._split_keys = {split: self._partition(split) for split in SPLITS}

  # --- subjects -------------------------------------------------------------------------------

  def _partition(self, split):
    """Per category, this split's share of coarse keys (pattern, colour pair), shuffled."""
    keys = list(itertools.product(PATTERNS, _color_pairs()))
    shares = []
    for c in range(len(CATEGORIES)):
      order = np.random.default_rng([self.seed, c, 0x5EED]).permutation(len(keys))
      held_out = np.arange(len(keys)) % _EVAL_SHARE == 0
      chosen = order[held_out] if split == "eval" else order[~held_out]
      shares.append([keys[i] for i in chosen])
    return shares

  def capacity(self, split: str) -> int:
    """How many distinct subjects `subjects(split, count)` can make."""
    self._check_split(split)
    return len(CATEGORIES) * min(len(keys) for keys in self._split_keys[split])

  def _check_split(self, split):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; known: {SPLITS}")

  def train_pool(self, count: int) -> list[Subject]:
    """Up to `count` train-split subjects (at most the split's capacity): the pool the world
    CLIP's and the base's oracle renders draw from. No eval identity is ever among them."""
    return self.subjects("train", min(count, self.capacity("train")))

  def subjects(self, split: str, count: int, start: int = 0) -> list[Subject]:
    """Subjects start..start+count-1 of a split (subject i is the same whatever the count);
    categories take turns so all are covered."""
    self._check_split(split)
    _check_count("count", count)
    _check_count("start", start)
    if start + count > self.capacity(split):
      raise ValueError(f"start {start} + count {count} exceeds the {split!r} split's "
                       f"capacity {self.capacity(split)}")
    split_code = SPLITS.index(split)
    category_order = np.random.default_rng([self.seed, split_code, 0xCA7]).permutation(
        len(CATEGORIES))
    subjects = []
    for i in range(start, start + count):
      c = int(category_order[i % len(CATEGORIES)])
      pattern, (primary, secondary) = self._split_keys[split][c][i // len(CATEGORIES)]
      rng = np.random.default_rng([self.seed, split_code, i])
      colors = [primary, secondary]
      if rng.random() < 0.5:
        colors.append(str(rng.choice([n for n in PALETTE if n not in colors])))
      subjects.append(Subject(
          subject_id=f"{split}-{i:05d}", split=split, category=CATEGORIES[c], pattern=pattern,
          colors=tuple(colors), pattern_scale=float(rng.choice(PATTERN_SCALES)),
          pattern_angle=int(rng.choice(PATTERN_ANGLES)), aspect=float(rng.choice(ASPECTS)),
          roundness=float(rng.choice(ROUNDNESSES)),
          notch=int(rng.choice(NOTCHES)) if rng.random() < 0.5 else -1,
          outline=str(rng.choice(OUTLINES))))
    return subjects

  # --- captions -------------------------------------------------------------------------------

  def prompt(self, subject: Subject, scene: Scene) -> str:
    return format_prompt(subject.category, scene)

  def parse_prompt(self, prompt: str) -> Scene:
    return parse(prompt)[1]

  # --- rendering ------------------------------------------------------------------------------

  def _layout(self, seed):
    """(centre x, centre y, width), as fractions of the image; depends on the seed only."""
    rng = np.random.default_rng([seed, 0x1A])
    width = rng.uniform(0.4, 0.58)
    cx = rng.uniform(0.5 * width + 0.03, 1 - 0.5 * width - 0.03)
    # Lower bound leaves room for a hat above the subject.
    cy = rng.uniform(0.55 * width + 0.12, 1 - 0.5 * width - 0.03)
    return cx, cy, width

  def render(self, subject: Subject, prompt: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: `subject` as `prompt` asks. uint8 [S, S, 3] image, bool [S, S] mask.

    The layout and background depend on `seed` only, so two subjects rendered with one seed
    and prompt differ only in the subject's pixels. The mask is the subject's own visible
    pixels (not its accessory), at least half covered.
    """
    category, scene = parse(prompt)
    if category != subject.category:
      raise ValueError(f"prompt {prompt!r} asks for a {category}, but subject "
                       f"{subject.subject_id!r} is a {subject.category}")
    _check_count("seed", seed)
    size, f = self.image_size, _SUPERSAMPLE
    u, v = self._u, self._v
    img = _BACKGROUND_FNS[scene.background](u, v, np.random.default_rng([seed, 0xB6]), size)
    img = np.broadcast_to(img, (size * f, size * f, 3)).astype(np.float32)
    if self._blur_radius:
      img = _blur(img, self._blur_radius)

    cx, cy, width = self._layout(seed)
    unit = width / 2  # image fraction per local unit
    stretch = math.sqrt(subject.aspect)
    x, y = (u - cx) / (unit * stretch), (v - cy) * stretch / unit
    # Draw only in the window that can hold the subject, its hat and its shadow.
    cols = np.nonzero(np.abs(x[0]) <= 1.4)[0]
    rows = np.nonzero((y[:, 0] >= -1.9) & (y[:, 0] <= 1.3))[0]
    window = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    coverage = np.zeros(img.shape[:2], np.float32)
    img[window], coverage[window] = self._draw_subject(
        img[window], subject, scene, x[:, window[1]], y[window[0]], line=max(
            1.0, size / 32) / size / unit)

    if scene.style == "sketch":
      img = _sketch(img, f)
    elif scene.style == "painting":
      img, coverage = _painting(img, coverage, np.random.default_rng([seed, 0x5A]), f)
    img, coverage = _downsample(img, f), _downsample(coverage, f)
    if scene.style == "pixel_art":
      img, coverage = _pixel_art(img, coverage)
    image = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return image, coverage >= 0.5

  def _draw_subject(self, img, subject, scene, x, y, line):
    """Paints the subject over `img` at local coordinates (x, y); returns (img, coverage).

    `line` is the outline width in local units. Coverage is 1 on the subject's visible
    pixels, 0 elsewhere (and under its accessory).
    """
    category = subject.category
    shadow = _ellipse(x, y, 0.0, 0.98, 0.8, 0.13) < 0
    img = np.where(shadow[..., None], img * 0.7, img)
    body = _body(category, x, y, subject.roundness)
    if subject.notch >= 0:
      nx, ny = _notch_centre(category, subject.roundness, subject.notch)
      body = np.maximum(body, -_circle(x, y, nx, ny, 0.28))
    colors = _rgb([PALETTE[c] for c in subject.colors])
    if scene.color:  # property modification: a new primary colour, the same pattern
      colors[0] = _COLOR_RGB[scene.color]
    colour = _colorize(_pattern_level(subject, x, y, len(colors)), colors)
    # A little light from the top left, so subjects look solid.
    colour = colour * np.clip(1.0 - 0.1 * (0.5 * x + 0.8 * y), 0.85, 1.12)[..., None]
    silhouette = body
    for sdf, rgb in _features(category, x, y):
      colour = _over(colour, sdf < 0, _rgb(rgb))
      silhouette = np.minimum(silhouette, sdf)
    if subject.outline != "none":
      colour = _over(colour, silhouette >= 0, _rgb(PALETTE[subject.outline]))
      silhouette = silhouette - line
    coverage = silhouette < 0
    img = _over(img, coverage, np.clip(colour, 0, 1))
    if scene.accessory:
      for sdf, rgb in _accessory_parts(scene.accessory, x, y, category, body):
        img = _over(img, sdf < 0, _rgb(rgb))
        coverage &= sdf >= 0
    return img, coverage

  # --- clusters -------------------------------------------------------------------------------

  def _unseen_scenes(self, subject, demo_backgrounds, count, rng):
    """Creative scenes: new backgrounds, recolours, accessories and styles, mixed."""
    fresh = [b for b in BACKGROUNDS if b not in demo_backgrounds]
    # Recolour only to colours that visibly differ from all of the subject's own.
    own = _rgb([PALETTE[c] for c in subject.colors])
    recolours = [c for c in COLORS if np.linalg.norm(own - _rgb(_COLOR_RGB[c]), axis=-1).min()
                 > _MIN_PAIR_DISTANCE] or list(COLORS)
    skills = ["background", "color", "accessory", "style"]
    start = int(rng.integers(len(skills)))
    scenes = []
    for attempt in range(100 * count + 100):
      if len(scenes) == count:
        break
      skill = skills[(start + attempt) % len(skills)]
      if skill == "background":
        if not fresh:
          continue
        scene = Scene(str(rng.choice(fresh)))
      else:
        fields = {skill: str(rng.choice({"color": recolours, "accessory": ACCESSORIES,
                                         "style": STYLES}[skill]))}
        if rng.random() < 0.25:  # sometimes two skills at once
          extra = str(rng.choice([s for s in ("color", "accessory") if s != skill]))
          fields[extra] = str(rng.choice(recolours if extra == "color" else ACCESSORIES))
        scene = Scene(str(rng.choice(BACKGROUNDS)), **fields)
      if scene not in scenes and (scene.color or scene.accessory or scene.style
                                  or scene.background not in demo_backgrounds):
        scenes.append(scene)
    if len(scenes) < count:
      raise ValueError(f"could not find {count} unseen prompts for {subject.subject_id!r}")
    return scenes

  def cluster(self, subject: Subject, num_images: int, num_unseen_prompts: int,
              seed: int = 0) -> SubjectCluster:
    """Demo images of `subject` (plain re-contextualizations) and prompts it was not shown in."""
    _check_count("num_images", num_images)
    _check_count("num_unseen_prompts", num_unseen_prompts)
    _check_count("seed", seed)
    rng = np.random.default_rng(_seed_of(subject.to_json(), seed))
    backgrounds = [str(b) for b in rng.permutation(BACKGROUNDS)]
    backgrounds = [backgrounds[i % len(backgrounds)] for i in range(num_images)]
    captions = [self.prompt(subject, Scene(b)) for b in backgrounds]
    renders = [self.render(subject, c, int(s))
               for c, s in zip(captions, rng.integers(0, 2**31, num_images))]
    scenes = self._unseen_scenes(subject, set(backgrounds), num_unseen_prompts, rng)
    return SubjectCluster(
        subject_id=subject.subject_id, class_name=subject.category,
        images=[image for image, _ in renders], captions=captions,
        prompts=[self.prompt(subject, s) for s in scenes],
        masks=[mask for _, mask in renders], spec=subject.to_json())

  def clusters(self, split: str, count: int, min_images: int, max_images: int,
               num_unseen_prompts: int, start: int = 0) -> Iterator[SubjectCluster]:
    """Clusters of subjects start..start+count-1, with [min_images, max_images] images each.

    Arguments are checked now; clusters are rendered lazily, one per step.
    """
    _check_count("min_images", min_images, 1)
    _check_count("max_images", max_images, 1)
    _check_count("num_unseen_prompts", num_unseen_prompts)
    if min_images > max_images:
      raise ValueError(f"min_images ({min_images}) must be <= max_images ({max_images})")
    subjects = self.subjects(split, count, start)
    split_code = SPLITS.index(split)
    num_images = [int(np.random.default_rng([self.seed, split_code, i, 0x1C]).integers(
        min_images, max_images + 1)) for i in range(start, start + count)]
    return (self.cluster(s, n, num_unseen_prompts) for s, n in zip(subjects, num_images))


def from_config(config) -> World:
  return World(config.data.world.seed, config.image_size, config.data.world.background_blur)
