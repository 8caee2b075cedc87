"""The world CLIP: a small CLIP trained contrastively on the embedded world, saved like a real one.

No pretrained CLIP can be downloaded, yet SuTI needs one: the delta-CLIP filter scores expert
samples against prompts, and evaluation reports CLIP-T / CLIP-I. This trains a tiny
`FlaxCLIPModel` on the world's (image, caption) pairs and saves it with `save_pretrained`, plus a
CLIP tokenizer over the world's words, so `suti.clip.ClipScorer.from_pretrained(workdir/'clip')`
loads it exactly as it loads openai/clip-vit-*.

The real captions only vary the background ('a star on the grass'); the prompts the filter
scores also recolour, accessorize and restyle. So three quarters of every batch are drawn by the
world's oracle (`World.render`) for random prompts of the whole grammar, as minimal pairs (see
`make_transform`), from many subjects of the world's train split.

Real CLIP's image embedding also keeps an object's looks, so DreamBench's CLIP-I tracks
identity. The world's captions cannot describe a procedural subject's looks, and a CLIP
trained on them alone saw the scene only (CLIP-I blind to identity). With
`clip.identity_weight` each group adds three renders for an image-image term
(`identity_loss`): a subject in one scene must match itself, background masked, in another,
against another subject of its category there.

Writes workdir/clip/: config.json, flax_model.msgpack, tokenizer files, preprocessor_config.json,
checkpoints/ (resume), logs/ (TensorBoard, metrics.jsonl) and summary.json, written last: its
presence marks the stage complete and re-running returns it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from suti import checkpoint as checkpoint_lib
from suti import clip as clip_lib
from suti import files
from suti import metrics
from suti import train_lib
from suti.data import pipeline
from suti.data import world as world_lib

log = logging.getLogger("suti.clip")

ORACLE_SUBJECTS = 4096   # world train-split subjects the oracle draws from
CHECKPOINT_EVERY = 250   # steps
LOG_EVERY = 25           # steps
WARMUP_STEPS = 50
WEIGHT_DECAY = 1e-4
_MAX_LOGIT_SCALE = 100.0  # as CLIP: exp(logit_scale) is clipped at 100
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
IDENTITY_VIEWS = 3         # the group's last three pairs (make_transform's identity_views)
IDENTITY_TEMPERATURE = 0.1
# Masked pixels get CLIP's normalisation mean, which the model sees as 0: what
# metrics.background_fill gives a ClipScorer (the training loop has no scorer yet).
_MASK_FILL = np.rint(255 * np.asarray(clip_lib.OPENAI_CLIP_MEAN)).astype(np.uint8)


def stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "clip"


# ---------------------------------------------------------------------------------------------
# The tokenizer: CLIP's byte-level BPE, with merges that make each world word one token.


def world_tokenizer_files(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """vocab.json and merges.txt contents for a CLIP BPE where every word is a single token.

  Merges assemble each word right to left from its end-of-word token ('t</w>', 'rt</w>',
  'art</w>'). Every merge's right side ends in '</w>', so within a word only the pair holding
  its last token can ever merge: merge ranks never compete, words sharing suffixes share
  tokens, and each word ends as one token. Other text falls back to single bytes.
  """
  from transformers.models.clip import tokenization_clip  # pylint: disable=import-outside-toplevel
  byte_symbols = tokenization_clip.bytes_to_unicode()  # byte-level BPE's printable bytes
  chars = list(byte_symbols.values())
  vocab = chars + [c + "</w>" for c in chars]
  merges, known = [], set(vocab)
  for word in sorted({w.lower() for w in words}):
    word = "".join(byte_symbols[b] for b in word.encode("utf-8"))
    suffix = word[-1] + "</w>"
    for ch in reversed(word[:-1]):
      merged = ch + suffix
      if merged not in known:
        merges.append((ch, suffix))
        vocab.append(merged)
        known.add(merged)
      suffix = merged
  # Specials last: end-of-text has the highest id, as in OpenAI's vocabulary.
  vocab += [_BOS, _EOS]
  return {token: i for i, token in enumerate(vocab)}, merges


def save_world_tokenizer(path, words=None, max_length: int = 77):
  """Writes a CLIPTokenizer over `words` (default: the world's vocabulary) to `path`."""
  import transformers  # pylint: disable=import-outside-toplevel
  words = world_lib.vocabulary() if words is None else words
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  vocab, merges = world_tokenizer_files(words)
  (path / "vocab.json").write_text(json.dumps(vocab))
  (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  tokenizer = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"),
                                         model_max_length=max_length)
  tokenizer.save_pretrained(str(path))
  return tokenizer


def world_clip_config(config, vocab_size: int, bos_id: int, eos_id: int):
  """A CLIPConfig of config.clip's sizes for config.image_size images."""
  import transformers  # pylint: disable=import-outside-toplevel
  cc = config.clip
  common = dict(hidden_size=cc.width, intermediate_size=4 * cc.width,
                num_hidden_layers=cc.num_layers, num_attention_heads=cc.num_heads,
                projection_dim=cc.embed_dim)
  text = transformers.CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=cc.max_length,
                                     bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                                     **common)
  vision = transformers.CLIPVisionConfig(image_size=config.image_size, patch_size=cc.patch_size,
                                         **common)
  return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=cc.embed_dim)


# ---------------------------------------------------------------------------------------------
# Data.


def vary_scene(scene: world_lib.Scene, rng: np.random.Generator) -> world_lib.Scene:
  """`scene` with one attribute changed: another background, or a colour, accessory or style
  added, swapped or removed."""
  field = ("background", "color", "accessory", "style")[int(rng.integers(4))]
  options = {"background": world_lib.BACKGROUNDS, "color": (None, *world_lib.COLORS),
             "accessory": (None, *world_lib.ACCESSORIES), "style": (None, *world_lib.STYLES)}
  current = getattr(scene, field)
  value = rng.choice([o for o in options[field] if o != current])
  return dataclasses.replace(scene, **{field: None if value is None else str(value)})


def identity_scene(rng: np.random.Generator) -> world_lib.Scene:
  """A random scene that keeps the subject's own looks: any background and accessory, no
  recolouring or restyling (those change what identity is measured on)."""
  return dataclasses.replace(world_lib.random_scene(rng), color=None, style=None)


def make_transform(tokenizer, max_length, world=None, subjects=(), identity_views=False):
  """grain random_transform: record -> {'image', 'ids', 'mask'} for a group of pairs.

  Without `subjects` (no world oracle) the group is the record's own pair. With them, each
  record also gets three oracle renders of `subjects` (world Subjects) that share one layout
  seed, so they differ only in their subject's pixels and in what their captions name:
    (A, scene), (A, the scene with one attribute changed), (B, scene), B of another category.
  These minimal pairs make category and every skill (colour, accessory, style) the only way to
  tell captions apart, and the delta-CLIP filter asks exactly that: the expert's sample and the
  demos show the same subject and differ in the prompt's skills. Drawing A and B from many
  subjects, not the dataset's few, stops the model from naming categories by their textures.

  With `identity_views` three more oracle pairs follow, for `identity_loss`:
    (A, scene2), (A, scene3), (C, scene3), C another subject of A's category,
  scene2 and scene3 in their own layouts and without colour or style skills, and the last two
  with their backgrounds masked out. The captions cannot tell A from C (they name a category
  and a scene); only the subject's pixels can. As for the world DINO (identity_train), the
  masked positive holds only the subject, so matching it means looking past the anchor's scene.
  """

  @functools.lru_cache(maxsize=None)  # the grammar is finite: tokenize each sentence once
  def encode(caption):
    out = tokenizer([caption], padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    return out["input_ids"][0].astype(np.int32), out["attention_mask"][0].astype(np.int32)

  def pick(rng, avoid_category=None):
    while True:
      subject = subjects[int(rng.integers(len(subjects)))]
      if subject.category != avoid_category:
        return subject

  by_category = {}
  for subject in subjects:
    by_category.setdefault(subject.category, []).append(subject)

  def pick_same_category(rng, subject):
    others = [s for s in by_category[subject.category] if s.subject_id != subject.subject_id]
    if not others:
      raise ValueError(f"clip.identity_weight needs two subjects of category "
                       f"{subject.category!r} in the oracle's pool; it has one")
    return others[int(rng.integers(len(others)))]

  def transform(record, rng):
    pairs = [(record["image"], record["caption"])]
    if len(subjects):
      scene = world_lib.random_scene(rng)
      seed = int(rng.integers(2**31))
      a = pick(rng)
      b = pick(rng, avoid_category=a.category)
      views = [(a, scene, seed), (a, vary_scene(scene, rng), seed), (b, scene, seed)]
      if identity_views:
        scene2, scene3 = identity_scene(rng), identity_scene(rng)
        seed2, seed3 = int(rng.integers(2**31)), int(rng.integers(2**31))
        c = pick_same_category(rng, a)
        views += [(a, scene2, seed2), (a, scene3, seed3), (c, scene3, seed3)]
      for k, (subject, s, layout) in enumerate(views):
        caption = world.prompt(subject, s)
        image, subject_mask = world.render(subject, caption, layout)
        if identity_views and k >= len(views) - 2:  # the positive and its twin: subject alone
          image = metrics.mask_background(image[None], subject_mask[None], _MASK_FILL)[0]
        pairs.append((image, caption))
    ids, mask = zip(*(encode(caption) for _, caption in pairs))
    return {"image": np.stack([np.asarray(image, np.uint8) for image, _ in pairs]),
            "ids": np.stack(ids), "mask": np.stack(mask)}

  return transform


# ---------------------------------------------------------------------------------------------
# Training.


def init_params(model, seed: int):
  """Fresh weights from the model's shape tree: N(0, 0.02) weights, zero biases, unit norms.

  Running transformers' init_weights instead costs a 10-20 s XLA compile (or longer eagerly)
  on a 2-core CPU, for a model whose first steps take a fraction of a second.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    name = path[-1]
    if name == "logit_scale":
      return jnp.full(shape.shape, model.config.logit_scale_init_value, jnp.float32)
    if name == "bias":
      return jnp.zeros(shape.shape, jnp.float32)
    if name == "scale":
      return jnp.ones(shape.shape, jnp.float32)
    return jnp.asarray(rng.normal(0.0, 0.02, shape.shape), jnp.float32)

  flat = traverse_util.flatten_dict(model.params_shape_tree)
  return traverse_util.unflatten_dict({k: leaf(k, v) for k, v in sorted(flat.items())})


def contrastive_loss(image_emb, text_emb, ids, logit_scale):
  """CLIP's symmetric InfoNCE; identical captions in a batch are not each other's negatives.

  Many pairs share a caption ('a star on the grass' for several subjects, or two images of
  one subject). Counting such an image as a negative for its twin caption would punish the
  model for the right answer, so those logits are masked out of both softmaxes; each pair's
  own caption stays its one positive. Returns (loss, image->text accuracy).
  """
  image_emb, text_emb = clip_lib.l2_normalize(image_emb), clip_lib.l2_normalize(text_emb)
  scale = jnp.minimum(jnp.exp(logit_scale), _MAX_LOGIT_SCALE)
  logits = scale * image_emb @ text_emb.T
  same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1)
  twins = same & ~jnp.eye(len(ids), dtype=bool)
  logits = jnp.where(twins, -1e9, logits)
  labels = jnp.arange(len(ids))
  loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
  return loss, accuracy


def identity_loss(anchor_emb, positive_emb, negative_emb):
  """InfoNCE over images: each anchor must pick its own subject in another scene (positive)
  out of every record's positive and hard negative (another subject of its category, in the
  positive's scene and layout). Returns (loss, accuracy).

  Real CLIP's image embedding keeps an object's looks because web captions describe them;
  the world's captions cannot (identities are procedural), so this term stands in for them
  and lets CLIP-I measure identity as it does on photos. Fixed temperature: the CLIP's own
  logit scale stays the text contrast's.
  """
  anchor = clip_lib.l2_normalize(anchor_emb)
  candidates = clip_lib.l2_normalize(jnp.concatenate([positive_emb, negative_emb]))
  logits = anchor @ candidates.T / IDENTITY_TEMPERATURE
  labels = jnp.arange(len(anchor))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, axis=1) == labels)


def make_train_step(model, tx, image_size, mean, std, identity_weight: float = 0.0):
  def loss_fn(params, batch):
    records, group = batch["ids"].shape[:2]
    flatten = lambda x: x.reshape((-1,) + x.shape[2:])  # [records, group, ...] -> [pairs, ...]
    pixels = clip_lib.preprocess(flatten(batch["image"]), image_size, mean, std)
    image_emb = model.get_image_features(pixels, params=params).reshape(records, group, -1)
    # The identity views stay out of the text contrast: their captions cannot tell A from its
    # twin, so it would pull the two images together, against identity_loss.
    texts = group - IDENTITY_VIEWS if identity_weight else group
    ids, mask = batch["ids"][:, :texts], batch["mask"][:, :texts]
    text_emb = model.get_text_features(flatten(ids), attention_mask=flatten(mask), params=params)
    text_loss, accuracy = contrastive_loss(flatten(image_emb[:, :texts]), text_emb, flatten(ids),
                                           params["logit_scale"])
    metrics = {"text_loss": text_loss, "accuracy": accuracy}
    loss = text_loss
    if identity_weight:
      views = image_emb[:, texts:]
      id_loss, id_accuracy = identity_loss(views[:, 0], views[:, 1], views[:, 2])
      loss = loss + identity_weight * id_loss
      metrics.update(identity_loss=id_loss, identity_accuracy=id_accuracy)
    return loss, metrics

  def train_step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads),
                               "logit_scale": jnp.exp(params["logit_scale"])}

  return train_step


def make_optimizer(learning_rate: float, num_steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, min(WARMUP_STEPS, max(num_steps // 10, 1)), max(num_steps, 2),
      end_value=0.1 * learning_rate)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=WEIGHT_DECAY))


# ---------------------------------------------------------------------------------------------
# Evaluation on the held-out subjects.


def evaluate(scorer: clip_lib.ClipScorer, clusters, world, threshold: float = 0.02) -> dict:
  """Retrieval, own-caption and delta-CLIP checks on eval clusters (their subjects unseen).

  - retrieval_top{1,5}: image -> text over every distinct eval caption and unseen prompt; the
    images are the real eval images plus oracle renders of each subject for its prompts
    (prompt_top{1,5}: those renders only, the prompts the delta filter scores).
  - own_caption_*: real eval images against the distinct real eval captions: the fraction
    whose own caption scores above the mean of the others / above every other, and the
    fraction of (image, other caption) pairs where the own caption wins (chance: 0.5).
  - delta_*: per (subject, unseen prompt), the delta-CLIP of the oracle's render (a perfect
    expert: should pass the threshold) and of a fresh render of one of the subject's own
    captions (an expert that ignores the prompt: should fail), against the real images.
  """
  real_images, real_captions, prompt_images, prompts, owners = [], [], [], [], []
  for index, cluster in enumerate(clusters):
    real_images += cluster.images
    real_captions += cluster.captions
    subject = world_lib.Subject.from_json(cluster.spec) if cluster.spec else None
    for j, prompt in enumerate(cluster.prompts if subject is not None else []):
      prompt_images.append(world.render(subject, prompt, 10_000 + 97 * index + j)[0])
      prompts.append(prompt)
      owners.append((index, cluster, subject, j))
  if not real_images:
    raise ValueError("evaluate: the eval split has no images")
  texts = sorted(set(real_captions) | set(prompts))
  text_emb = scorer.embed_texts(texts)
  images = np.stack(real_images + prompt_images)
  labels = np.array([texts.index(t) for t in real_captions + prompts])
  sims = scorer.embed_images(images) @ text_emb.T
  rank = (sims > sims[np.arange(len(labels)), labels][:, None]).sum(1)  # 0: own text is top
  n_real = len(real_images)
  out = {"eval_images": len(images), "eval_texts": len(texts),
         "retrieval_top1": float(np.mean(rank < 1)), "retrieval_top5": float(np.mean(rank < 5)),
         "retrieval_chance_top1": 1 / len(texts), "retrieval_chance_top5": min(5 / len(texts), 1)}
  if prompts:
    out["prompt_top1"] = float(np.mean(rank[n_real:] < 1))
    out["prompt_top5"] = float(np.mean(rank[n_real:] < 5))

  captions = sorted(set(real_captions))
  if len(captions) > 1:
    cap_sims = sims[:n_real][:, [texts.index(c) for c in captions]]
    own_index = np.array([captions.index(c) for c in real_captions])
    own = cap_sims[np.arange(n_real), own_index]
    others = np.ones_like(cap_sims, bool)
    others[np.arange(n_real), own_index] = False
    other_sims = cap_sims[others].reshape(n_real, -1)
    out["own_caption_beats_mean"] = float(np.mean(own > other_sims.mean(1)))
    out["own_caption_beats_all"] = float(np.mean(own > other_sims.max(1)))
    out["own_caption_pairwise"] = float(np.mean(own[:, None] > other_sims))

  if prompts:
    ignored = np.stack([world.render(s, c.captions[j % len(c.captions)], 20_000 + 97 * i + j)[0]
                        for i, c, s, j in owners])
    demos = [np.stack(c.images) for _, c, _, _ in owners]
    good = scorer.delta(np.stack(prompt_images), demos, prompts)["delta"]
    bad = scorer.delta(ignored, demos, prompts)["delta"]
    out.update(delta_threshold=threshold, delta_oracle_mean=float(good.mean()),
               delta_oracle_pass=float(np.mean(good > threshold)),
               delta_ignored_mean=float(bad.mean()),
               delta_ignored_pass=float(np.mean(bad > threshold)))
  return out


# ---------------------------------------------------------------------------------------------
# The stage.


def train_world_clip(config, workdir) -> dict:
  """Trains (or resumes, or skips when complete) the world CLIP; returns its summary."""
  import transformers  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  out = stage_dir(workdir)
  summary_path = out / "summary.json"
  if summary_path.exists():
    log.info("clip: complete (%s); skipping", summary_path)
    return json.loads(summary_path.read_text())
  cc = config.clip
  out.mkdir(parents=True, exist_ok=True)

  tokenizer = save_world_tokenizer(out, max_length=cc.max_length)
  vocab = tokenizer.get_vocab()
  model_config = world_clip_config(config, len(vocab), vocab[_BOS], vocab[_EOS])
  model = transformers.FlaxCLIPModel(model_config, _do_init=False)
  params = init_params(model, config.seed)
  mean, std = clip_lib.OPENAI_CLIP_MEAN, clip_lib.OPENAI_CLIP_STD
  longest = max(len(tokenizer(p)["input_ids"]) for p in _longest_prompts())
  if longest > cc.max_length:
    log.warning("clip.max_length=%d truncates the grammar's longest prompts (%d tokens)",
                cc.max_length, longest)

  pairs = pipeline.PairSource(pipeline.ClusterSource(workdir / "data", "train"))
  world = world_lib.from_config(config)
  # The oracle draws from many more subjects of the world's train split than the dataset
  # holds (see make_transform). Eval subjects are never among them: the world's split
  # partitions identities, so the eval numbers below stay held out. Real photos (no spec):
  # no oracle, plain pairs.
  pool = (world.train_pool(ORACLE_SUBJECTS)
          if all(pairs.cluster(i).spec for i in range(pairs.num_subjects)) else [])
  identity_views = bool(pool) and cc.identity_weight > 0
  if cc.identity_weight > 0 and not pool:
    log.warning("clip.identity_weight=%s needs the world's oracle renders; these subjects have "
                "none (real photos), so the CLIP trains on its pairs alone", cc.identity_weight)
  group = (4 + IDENTITY_VIEWS * identity_views) if pool else 1
  records = max(1, cc.batch_size // group)  # batch_size counts pairs
  data = pipeline.make_iterator(
      pairs, batch_size=records, seed=config.seed, shard_by_process=False,
      random_transform=make_transform(tokenizer, cc.max_length, world, pool, identity_views))
  tx = make_optimizer(cc.learning_rate, cc.num_steps)
  opt_state = tx.init(params)
  ckpt = checkpoint_lib.Checkpoints.from_config(out / "checkpoints", config)
  step = 0
  restored = ckpt.restore(params=params, opt_state=opt_state)
  if restored is not None:
    params, opt_state, step = restored.params, restored.opt_state, restored.step
    data.set_state(restored.data_state)
    log.info("clip: resumed from step %d", step)

  train_step = jax.jit(make_train_step(model, tx, config.image_size, mean, std,
                                       cc.identity_weight if identity_views else 0.0),
                       donate_argnums=(0, 1))
  writer = train_lib.MetricWriter(out / "logs")
  throughput = train_lib.Throughput()
  start_step, start = step, time.time()
  metrics = {}
  bar = train_lib.progress(cc.num_steps, step, "clip")
  try:
    while step < cc.num_steps:
      params, opt_state, metrics = train_step(params, opt_state, next(data))
      step += 1
      throughput.add(records * group)
      if step % LOG_EVERY == 0 or step == cc.num_steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
          raise FloatingPointError(f"clip: loss is {metrics['loss']} at step {step}")
        metrics["images_per_second"] = throughput.rate()
        writer.scalars(step, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
      bar.update(1)
      if step % CHECKPOINT_EVERY == 0 or step == cc.num_steps:
        ckpt.save(step, params=params, opt_state=opt_state, config=config,
                  data_state=data.get_state(), meta={"stage": "clip"})
  except BaseException:
    writer.close()
    raise
  finally:
    bar.close()
    ckpt.close()
  seconds = time.time() - start
  if not metrics:  # resumed at the last step: report the last logged values
    logged = [m for m in train_lib.read_metrics(out / "logs") if "loss" in m]
    metrics = logged[-1] if logged else {}

  model.save_pretrained(str(out), params=jax.device_get(params))
  transformers.CLIPImageProcessor(
      size={"shortest_edge": config.image_size},
      crop_size={"height": config.image_size, "width": config.image_size},
      image_mean=list(mean), image_std=list(std)).save_pretrained(str(out))
  # Evaluate through the one loading path every consumer uses.
  scorer = clip_lib.ClipScorer.from_pretrained(out)
  result = evaluate(scorer, pipeline.ClusterSource(workdir / "data", "eval"), world,
                    config.experts.delta_clip_threshold)
  if pool:
    # Does CLIP-I measure identity? The AUC the world DINO reports, for this CLIP: same
    # subject in another context against another subject of its category, on whole images
    # (CLIP-I) and with backgrounds masked. No caption names a subject's looks, and scenes
    # fill most of a 16x16 frame: whole images give about 0.45 (DINO's: 0.83).
    from suti import identity_train  # pylint: disable=import-outside-toplevel
    held_out = identity_train.subjects_of(config, workdir, "eval", identity_train.EVAL_SUBJECTS)
    for key, masked in (("identity_auc", False), ("identity_auc_masked", True)):
      result[key] = identity_train.identity_auc(scorer, world, held_out, seed=config.seed,
                                                masked=masked)
  writer.scalars(step, {f"eval/{k}": v for k, v in result.items()})
  writer.close()
  summary = {"path": str(out), "steps": step, "train_seconds": round(seconds, 1),
             "pairs_per_step": records * group,
             "images_per_second": round((step - start_step) * records * group
                                        / max(seconds, 1e-9), 1),
             "final_loss": metrics.get("loss", float("nan")),
             "final_batch_accuracy": metrics.get("accuracy", float("nan")),
             "params": int(sum(x.size for x in jax.tree_util.tree_leaves(params))), **result}
  print("clip: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in summary.items() if k != "path"))
  files.write_json(summary_path, summary)  # last: marks the stage complete
  return summary


def _longest_prompts() -> list[str]:
  """The grammar's longest sentences (style + colour + accessory + the longest background)."""
  return [world_lib.format_prompt("mushroom", world_lib.Scene(
      "brick", color="yellow", accessory="glasses", style="painting"))]

