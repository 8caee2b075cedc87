"""The apprentice: Re-Imagen wiring, zero-init equivalence, training on the buffer, in-context
generation (demo cache, guidance, determinism, Dream-SuTI), its CLI and bad input."""
import json
import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apprentice import data as data_lib
from apprentice import generate as gen
from apprentice import stage
from apprentice.model import Apprentice, is_new_param, new_param_count
from experts import buffer as buffer_lib
from experts import stage as experts_stage
from suti import checkpoint, config_lib, diffusion, plan, pretrain, train_lib
from suti.data import builder
from suti.data import pipeline
from suti.data import world as world_lib
from suti.model import TextToImage
from suti.nn.unet import count_params
from tests.conftest import REPO, load_config


def _config(**apprentice):
  config = load_config("tiny")
  config.apprentice.sample_steps = 4
  config.apprentice.log_every = 1
  config.apprentice.sample_every = 1000
  config.apprentice.num_sample_subjects = 2
  for key, value in apprentice.items():
    config.apprentice[key] = value
  return config_lib.validate(config)


def _perturbed(tree, seed, scale=0.05):
  """Every leaf plus noise: zero-initialised layers of a fresh init become non-trivial."""
  # numpy, not jax.random: an eager jax draw compiles once per leaf shape (~1 s each on CPU).
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape), x.dtype), tree)


@pytest.fixture(scope="module")
def models():
  """(config, apprentice, base, base params, frozen, apprentice params from the base)."""
  config = _config()
  base = TextToImage(config)
  base_params, frozen = base.init(jax.random.PRNGKey(0))
  base_params = _perturbed(base_params, 1)  # a 'trained' base: no all-zero output layers
  model = Apprentice(config)
  params = model.init_from_base(base_params, jax.random.PRNGKey(2))
  return config, model, base, base_params, frozen, params


def _demo_batch(model, batch, num_demos, seed=3):
  rng = np.random.default_rng(seed)
  size = model.image_size
  captions = model.tokenize(["a photo of a ball"] * num_demos) if num_demos else None
  length = model.text.max_length
  return {
      "demo_images": rng.uniform(-1, 1, (batch, num_demos, size, size, 3)).astype(np.float32),
      "demo_ids": (np.repeat(captions["ids"][None], batch, 0) if num_demos
                   else np.zeros((batch, 0, length), np.int32)),
      "demo_id_mask": (np.repeat(captions["mask"][None], batch, 0) if num_demos
                       else np.zeros((batch, 0, length), bool)),
      "demo_mask": np.ones((batch, num_demos), bool)}


def _inputs(model, batch=2, seed=4):
  rng = np.random.default_rng(seed)
  size = model.image_size
  x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
  t = jnp.asarray(rng.integers(0, model.schedule.num_steps, batch), jnp.int32)
  return x, t, model.tokenize(["a red ball in the snow", "a dog on a beach"][:batch])


# ------------------------------------------------------------------------------ the model

def test_zero_init_apprentice_equals_the_base_model(models):
  config, model, base, base_params, frozen, params = models
  x, t, tokens = _inputs(model)
  reference = base.denoise_fn(base_params["unet"], x, t, base.encode(base_params, frozen, tokens))
  assert float(jnp.abs(reference).mean()) > 1e-2  # a non-trivial base output
  predict = jax.jit(lambda p, batch: model.denoise_fn(
      p["unet"], x, t, model.condition(p, frozen, batch)))
  for n in (0, 1, 3):
    out = predict(params, dict(tokens, **_demo_batch(model, 2, n)))
    # Two XLA programs, fused differently: float32 rounding differs by ~1e-6 (1.2e-6 on a
    # Zen 3 CPU without AVX-512); a demo layer that was not zero would move it by ~1e-2.
    np.testing.assert_allclose(out, reference, atol=1e-5)
  # Every base param is reused, the new ones are exactly the demo layers.
  assert count_params(params) == count_params(base_params) + new_param_count(params)
  assert new_param_count(params) > 0
  # Once the new layers are trained (perturbed), the output depends on the demos.
  trained = _perturbed(params, 5)
  a = predict(trained, dict(tokens, **_demo_batch(model, 2, 3, seed=6)))
  b = predict(trained, dict(tokens, **_demo_batch(model, 2, 3, seed=7)))
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_demo_positions_add_no_params_and_start_as_the_base(models):
  # apprentice.demo_positions: fixed sinusoids, nothing to learn; the zero-initialised demo
  # layers still make the fresh apprentice the base, and trained ones read positions.
  config, model, base, base_params, frozen, params = models
  placed = Apprentice(_config(demo_positions=True))
  placed_params = placed.init_from_base(base_params, jax.random.PRNGKey(2))
  assert jax.tree.map(jnp.shape, placed_params) == jax.tree.map(jnp.shape, params)
  x, t, tokens = _inputs(model)
  batch = dict(tokens, **_demo_batch(model, 2, 3))
  reference = base.denoise_fn(base_params["unet"], x, t, base.encode(base_params, frozen, tokens))

  def predict(m, p):
    return m.denoise_fn(p["unet"], x, t, m.condition(p, frozen, batch))

  np.testing.assert_allclose(predict(placed, placed_params), reference, atol=1e-5)
  trained = _perturbed(params, 5)
  assert float(jnp.abs(predict(placed, trained) - predict(model, trained)).max()) > 1e-3


def test_any_number_of_demos_gives_the_same_output_shape(models):
  config, model, _, _, frozen, params = models
  x, t, tokens = _inputs(model)
  trained = _perturbed(params, 5)
  r = model.resolutions[0]
  length = model.text.max_length
  @jax.jit  # retraced per demo count
  def predict(batch):
    cond = model.condition(trained, frozen, batch)
    return cond["demo"], model.denoise_fn(trained["unet"], x, t, cond)

  outputs = []
  for n in range(7):
    demo, out = predict(dict(tokens, **_demo_batch(model, 2, n)))
    tokens_r, mask_r = demo[r]
    assert tokens_r.shape[:2] == mask_r.shape == (2, max(n * (r * r + length), 1))
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    outputs.append(out)
  # Zero demos and masked demos are the same condition (the guidance "no demos" branch).
  masked = dict(tokens, **_demo_batch(model, 2, 3))
  masked["demo_mask"] = np.zeros_like(masked["demo_mask"])
  _, out = predict(masked)
  np.testing.assert_allclose(out, outputs[0], atol=1e-5)
  assert float(jnp.abs(outputs[3] - outputs[0]).max()) > 1e-3


def test_init_from_a_base_of_another_config_is_refused(models):
  config, model, *_ = models
  other = load_config("tiny")
  other.model.channels = 8  # the models' network, but narrower
  other_params, _ = TextToImage(other).abstract_init()
  with pytest.raises(ValueError, match="shape"):
    model.init_from_base(other_params, jax.random.PRNGKey(0))


def test_paper_apprentice_size_by_eval_shape():
  config = load_config("paper")
  base_model, base_params, _ = plan.abstract_model(config)
  model = Apprentice(config, text_encoder=base_model.text)
  params, _ = model.abstract_init()
  new = new_param_count(params)
  total = count_params(params)
  assert 2.0e9 < count_params(base_params) < 2.2e9
  assert 3.5e8 < new < 4.5e8, new                  # ~400M of new attention (+ its MLPs)
  assert 2.4e9 < total < 2.7e9, total              # ~2.5B, SuTI's apprentice
  assert total == count_params(base_params) + new


def test_plan_has_apprentice_rows(tmp_path):
  assert "apprentice.stage:plan_rows" in plan.ROW_BUILDERS
  config = _config()
  rows = stage.plan_rows(config, plan.make_context(config))
  assert [r.step for r in rows] == ["apprentice_train", "apprentice_sample"]
  assert rows[0].info["demos"] == config.apprentice.num_train_demos
  assert rows[1].info["demos"] == config.apprentice.num_inference_demos
  for row in rows:  # abstract: nothing allocated
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(row.args))


# ------------------------------------------------------------------------------ generation

def _demos(n=3, size=16, seed=0):
  return list(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_cached_demo_features_give_the_samples_of_recomputing_them(models):
  config, model, _, _, frozen, params = models
  trained = _perturbed(params, 5)
  for guidance in (gen.Guidance("joint", guidance=3.0),
                   gen.Guidance("text_first", text_guidance=2.0, demo_guidance=3.0),
                   gen.Guidance("image_first", text_guidance=2.0, demo_guidance=3.0)):
    batch = gen.demo_batch(model, np.stack(_demos()), None)
    samples = {}
    for cache in (True, False):
      conds, weights = gen.conditions(model, trained, frozen, "a red ball in the snow", batch,
                                      2, guidance, cache=cache)
      denoise, p = ((model.denoise_fn, trained["unet"]) if cache
                    else (model.denoise_uncached_fn, trained))
      samples[cache] = diffusion.sample(denoise, p, model.schedule, conds,
                                        jax.random.PRNGKey(0), (2, 16, 16, 3), weights=weights,
                                        steps=4)
    np.testing.assert_allclose(samples[True], samples[False], atol=1e-5)


def test_guidance_modes_reduce_to_the_conditional_output_at_weight_one(models):
  config, model, _, _, frozen, params = models
  trained = _perturbed(params, 5)
  x, t, _ = _inputs(model, batch=1)
  batch = gen.demo_batch(model, np.stack(_demos()), ["a ball", "", "a ball on grass"])
  outs = []
  for mode in gen.GUIDANCE_MODES:
    g = gen.Guidance(mode, guidance=1.0, text_guidance=1.0, demo_guidance=1.0)
    conds, weights = gen.conditions(model, trained, frozen, "a red ball", batch, 1, g)
    outs.append(diffusion.guided_prediction(model.denoise_fn, trained["unet"], x, t, conds,
                                            jnp.asarray(weights) if weights else []))
    branches, _ = g.branches()
    assert branches[-1] == (True, True)
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
  np.testing.assert_allclose(outs[2], outs[0], atol=1e-5)
  # Separate scales really separate: more demo guidance changes the prediction.
  g = gen.Guidance("text_first", text_guidance=1.0, demo_guidance=4.0)
  conds, weights = gen.conditions(model, trained, frozen, "a red ball", batch, 1, g)
  more = diffusion.guided_prediction(model.denoise_fn, trained["unet"], x, t, conds,
                                     jnp.asarray(weights))
  assert float(jnp.abs(more - outs[0]).max()) > 1e-3


def test_generate_is_deterministic_for_a_seed_and_resizes_demos(models, tmp_path):
  config, model, _, _, frozen, params = models
  trained = _perturbed(params, 5)
  # Demos of other sizes (arrays and a file) are centre-cropped and resized.
  path = tmp_path / "demo.png"
  train_lib.save_grid(path, np.stack(_demos(1, size=40)), columns=1, upscale=1)
  demos = _demos(2, size=24) + [str(path)]
  assert gen.read_demos(demos, 16).shape == (3, 16, 16, 3)
  a = gen.generate(model, trained, frozen, demos, "a red ball", num_images=2, seed=0, steps=4)
  b = gen.generate(model, trained, frozen, demos, "a red ball", num_images=2, seed=0, steps=4)
  c = gen.generate(model, trained, frozen, demos, "a red ball", num_images=2, seed=1, steps=4)
  assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert np.abs(a.astype(int) - c).max() > 0


def test_padded_demo_slots_change_nothing_and_share_one_compile(models):
  config, model, _, _, frozen, params = models
  trained = _perturbed(params, 5)
  demos, captions = _demos(3, seed=3), ["a ball", "", "a ball on grass"]
  batch = gen.demo_batch(model, np.stack(demos[:2]), captions[:2], pad_to=4)
  assert batch["demo_images"].shape[1] == 4 and batch["demo_mask"].tolist() == [
      [True, True, False, False]]
  draw = lambda n, pad: gen.generate(model, trained, frozen, demos[:n], "a red ball",
                                     captions=captions[:n], num_images=1, seed=0, steps=4,
                                     pad_demos_to=pad)
  # Masked slots are ignored: the images of the two demos alone, to float rounding.
  assert np.abs(draw(2, 4).astype(int) - draw(2, 0)).max() <= 1
  # One sampler and one demo encoder for every demo count up to the slots (evaluate's curve).
  samplers, encoders = diffusion._sample_loop._cache_size(), model._encode_demos_jit._cache_size()
  images = [draw(n, 4) for n in (1, 3)]
  assert diffusion._sample_loop._cache_size() == samplers
  assert model._encode_demos_jit._cache_size() == encoders
  assert np.abs(images[0].astype(int) - images[1]).max() > 0  # the demos still count


def test_bad_demos_and_too_many_demos_are_named(models, tmp_path):
  config, model, _, _, frozen, params = models
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  with pytest.raises(config_lib.InputError, match="broken.png"):
    gen.read_demos([broken], 16)
  with pytest.raises(config_lib.InputError, match="missing.png: no such file"):
    gen.read_demos([tmp_path / "missing.png"], 16)
  with pytest.raises(config_lib.InputError, match="2 captions for 3 demos"):
    gen.demo_batch(model, np.stack(_demos()), ["a", "b"])
  need = gen.demo_attention_bytes(model, 64, 2)
  with pytest.raises(gen.DemoMemoryError, match=r"64 demos do not fit .* use at most \d+"):
    gen.check_demo_memory(model, 64, 2, available=max(need.values()))
  gen.check_demo_memory(model, 4, 2, available=max(need.values()))  # 4 of them fit


def test_dream_suti_finetuning_fits_the_subject(models):
  config, model, _, _, frozen, params = models
  demos = np.stack(_demos(3))
  batch = gen.finetune_batches(demos, None, 8, 0, 0, model)
  targets = batch["image"]
  conditions = batch["demo_images"][:, 0]
  assert not any(np.array_equal(a, b) for a, b in zip(targets, conditions))  # never itself
  before = jax.tree.map(np.asarray, params)
  tuned, _ = gen.finetune(model, params, frozen, demos, num_steps=15, learning_rate=3e-3,
                          batch_size=4)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))

  def subject_loss(p):
    b = gen.finetune_batches(demos, None, 8, 999, 0, model)
    return np.mean([float(model.loss(p, frozen, b, jax.random.PRNGKey(k))) for k in range(4)])

  assert subject_loss(tuned) < subject_loss(params)
  # Another seed (evaluate gives each subject its own) reuses the compiled step: compiling it
  # per subject cost more than the fine-tuning.
  gen.finetune(model, params, frozen, demos, num_steps=1, learning_rate=3e-3, batch_size=4,
               seed=7)
  # Params committed to a device, as evaluate's are (restored from a checkpoint), over two
  # steps: the optimizer state's fresh zeros once recompiled the step at step 1.
  committed = jax.device_put(params, jax.devices()[0])
  gen.finetune(model, committed, frozen, demos, num_steps=2, learning_rate=3e-3, batch_size=4,
               seed=8)
  _, step_fn = gen._finetune_functions(model, 3e-3)  # pylint: disable=protected-access
  assert step_fn._cache_size() == 1  # pylint: disable=protected-access


# ------------------------------------------------------------------------------ the stage

def _write_buffer_round(config, workdir, round_, group):
  """One committed round: oracle renders of each subject's unseen prompts as pseudo-targets
  (what a perfect expert would draw)."""
  world = world_lib.from_config(config)
  clusters = list(pipeline.ClusterSource(workdir / "data", "train"))
  records = []
  for i in group:
    c = clusters[i]
    for prompt in c.prompts:
      image, _ = world.render(world_lib.Subject.from_json(c.spec), prompt, config.seed)
      records.append({"image": image, "demos": list(c.images),
                      "demo_captions": list(c.captions), "prompt": prompt,
                      "subject_id": c.subject_id, "delta": 0.1, "clip_target": 0.3,
                      "clip_demos_max": 0.2, "seed": 0, "sample_index": 0, "admitted": True})
  buffer_lib.BufferWriter(experts_stage.buffer_dir(workdir)).commit_round(
      round_, records, subject_ids=[clusters[i].subject_id for i in group])


def _write_buffer(config, workdir, rounds):
  for round_, group in enumerate(rounds):
    _write_buffer_round(config, workdir, round_, group)


def test_the_apprentice_reapplies_any_lambda_negative_ones_too(tmp_path):
  """The world CLIP's lambda is negative (the demo's: -0.1), so "negative" cannot mean
  'unset': None keeps the experts' verdicts, any float re-filters admitted and rejected."""
  deltas = [-0.6, -0.4, -0.2, 0.1]
  records = [{"image": np.zeros((4, 4, 3), np.uint8), "demos": [np.zeros((4, 4, 3), np.uint8)],
              "demo_captions": ["a ball"], "prompt": "a ball on the snow", "subject_id": "s",
              "delta": d, "clip_target": d, "clip_demos_max": 0.0, "seed": 0,
              "sample_index": i, "admitted": d > 0.0} for i, d in enumerate(deltas)]
  buffer_lib.BufferWriter(tmp_path).commit_round(0, records, {"threshold": 0.0})
  config = _config()
  assert stage.buffer_threshold(config) is None
  assert [r["delta"] for r in buffer_lib.BufferSource(tmp_path, None)] == [0.1]
  config.apprentice.delta_clip_threshold = -0.5
  threshold = stage.buffer_threshold(config)
  assert threshold == -0.5
  kept = sorted(r["delta"] for r in buffer_lib.BufferSource(tmp_path, threshold))
  assert kept == pytest.approx([-0.4, -0.2, 0.1])


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory):
  """Data, a base checkpoint and a 2-round buffer: what the apprentice stage reads."""
  config = _config()
  workdir = tmp_path_factory.mktemp("apprentice_base")
  builder.build(config, workdir / "data")
  base = TextToImage(config)
  params, _ = base.init(jax.random.PRNGKey(0))
  with checkpoint.Checkpoints(pretrain.base_checkpoint_dir(config, workdir)) as ckpt:
    ckpt.save(config.pretrain.num_steps, params=params, config=config)
  _write_buffer(config, workdir, [range(0, 4), range(4, 8)])
  (experts_stage.stage_dir(workdir) / "summary.json").write_text("{}")  # experts: done
  return workdir


def _workdir(base, path):
  path.mkdir(parents=True)
  for name in ("data", "pretrain", "experts"):
    os.symlink(base / name, path / name)
  return path


def _eval_loss(config, params, frozen, model, workdir):
  """Mean denoising loss over fixed buffer examples, noise and timesteps."""
  stream = data_lib.BufferStream(
      experts_stage.buffer_dir(workdir), batch_size=8, seed=123, transform=data_lib.make_example(
          model, 3, 0.0, 0.0, config.image_size))
  batch = next(stream)
  return np.mean([float(model.loss(params, frozen, batch, jax.random.PRNGKey(k)))
                  for k in range(4)])


@pytest.fixture(scope="module")
def trained(base_workdir, tmp_path_factory):
  config = _config(num_steps=12, checkpoint_every=4, learning_rate=3e-3)
  workdir = _workdir(base_workdir, tmp_path_factory.mktemp("trained") / "w")
  return config, workdir, stage.run(config, workdir)


def test_training_loss_decreases_and_outputs_exist(trained):
  config, workdir, summary = trained
  model = Apprentice(config)
  _, base_params, frozen = pretrain.load_base(config, workdir, model=model.base)
  start = model.init_from_base(base_params, jax.random.PRNGKey(config.seed + 2))
  model_trained, params, frozen = gen.load(stage.checkpoint_dir(workdir))
  assert summary["steps"] == 12 and summary["new_params"] == new_param_count(params)
  assert _eval_loss(config, params, frozen, model, workdir) < \
      _eval_loss(config, start, frozen, model, workdir)
  out = stage.stage_dir(workdir)
  assert (out / "samples" / "step_000012.png").exists()
  logged = train_lib.read_metrics(out / "logs")
  assert [m["step"] for m in logged if "loss" in m][-1] == 12
  # The whole buffer was seen: 8 subjects x 2 unseen prompts.
  assert summary["buffer_records_seen"] == 16
  assert stage.run(config, workdir) == summary  # complete: skipped


def test_freeze_base_trains_only_the_new_layers(base_workdir, tmp_path):
  """freeze_base (as configs/demo.py, here with the probe's high-noise loss options): every base
  weight is bit-identical to the checkpoint's, every new layer's kernel has moved."""
  config = _config(num_steps=3, checkpoint_every=3, learning_rate=3e-3, freeze_base=True,
                   high_noise_fraction=0.5, loss_weight_cap=20.0)
  workdir = tmp_path / "w"
  workdir.mkdir()
  for name in ("data", "experts"):
    os.symlink(base_workdir / name, workdir / name)
  # A 'trained' base: a fresh init's zero output layers would pass no gradient to the new ones.
  base_params, _ = TextToImage(config).init(jax.random.PRNGKey(0))
  with checkpoint.Checkpoints(pretrain.base_checkpoint_dir(config, workdir)) as ckpt:
    ckpt.save(config.pretrain.num_steps, params=_perturbed(base_params, 1), config=config)
  summary = stage.run(config, workdir)
  assert summary["steps"] == 3
  model = Apprentice(config)
  _, base_params, _ = pretrain.load_base(config, workdir, model=model.base)
  start = model.init_from_base(base_params, jax.random.PRNGKey(config.seed + 2))
  _, params, _ = gen.load(stage.checkpoint_dir(workdir))
  flat_start, flat = (traverse_util.flatten_dict(p, sep="/") for p in (start, params))
  moved = {k for k in flat if not np.array_equal(np.asarray(flat[k]), np.asarray(flat_start[k]))}
  new = {k for k in flat if is_new_param(k)}
  assert moved and moved <= new, sorted(moved - new)[:3]
  assert all(k in moved for k in new if k.endswith("out/kernel"))


def test_base_learning_rate_is_the_base_params_own_step(models):
  """Unfrozen with apprentice.base_learning_rate: Adam's first step moves each base param by
  that rate and each new layer by learning_rate; unset, every param by learning_rate."""
  config, _, _, _, _, params = models
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-4), params)  # under the norm clip
  for base_lr, base_step in ((None, 1e-3), (1e-5, 1e-5)):
    ac = _config(optimizer="adam", learning_rate=1e-3, base_learning_rate=base_lr).apprentice
    tx = stage.make_optimizer(ac, params)
    # jitted: op by op, every leaf's shape compiled its own kernels (a minute of the suite).
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    for path, update in traverse_util.flatten_dict(updates, sep="/").items():
      want = 1e-3 if is_new_param(path) else base_step
      np.testing.assert_allclose(np.abs(np.asarray(update)), want, rtol=1e-3, err_msg=path)


def test_cosine_schedule_decays_both_rates_to_zero_at_num_steps(models):
  """apprentice.lr_schedule='cosine': Adam's step (each param's |update| is the rate) follows
  the cosine, for the new layers and for the base's own rate."""
  config, _, _, _, _, params = models
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-4), params)
  ac = _config(optimizer="adam", learning_rate=1e-3, base_learning_rate=1e-5, warmup_steps=0,
               num_steps=10, lr_schedule="cosine").apprentice
  tx = stage.make_optimizer(ac, params)
  update = jax.jit(tx.update)
  state = jax.jit(tx.init)(params)
  seen = []
  for _ in range(10):
    updates, state = update(grads, state, params)
    flat = traverse_util.flatten_dict(updates, sep="/")
    seen.append({new: max(float(np.abs(np.asarray(u)).max()) for k, u in flat.items()
                          if is_new_param(k) == new) for new in (True, False)})
  for step, rates in enumerate(seen):
    cosine = 0.5 * (1 + np.cos(np.pi * step / 10))
    np.testing.assert_allclose(rates[True], 1e-3 * cosine, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(rates[False], 1e-5 * cosine, rtol=1e-3, atol=1e-11)
  assert seen[-1][True] < 0.03 * seen[0][True]


def test_resume_after_a_kill_gives_the_same_params(trained, base_workdir, tmp_path, monkeypatch):
  config, _, _ = trained
  reference = checkpoint.load_params(stage.checkpoint_dir(trained[1]))
  workdir = _workdir(base_workdir, tmp_path / "w")
  calls = {"n": 0}
  real_next = data_lib.BufferStream.__next__

  def dying_next(self):
    calls["n"] += 1
    if calls["n"] == 7:  # after the checkpoint at step 4, before the one at 8
      raise KeyboardInterrupt("killed")
    return real_next(self)

  monkeypatch.setattr(data_lib.BufferStream, "__next__", dying_next)
  with pytest.raises(KeyboardInterrupt):
    stage.run(config, workdir)
  monkeypatch.setattr(data_lib.BufferStream, "__next__", real_next)
  assert checkpoint.Checkpoints(stage.checkpoint_dir(workdir), read_only=True).latest_step() == 4
  stage.run(config, workdir)
  resumed = checkpoint.load_params(stage.checkpoint_dir(workdir))
  jax.tree.map(np.testing.assert_array_equal, reference, resumed)


def test_stream_sees_new_rounds_and_resumes_exactly(base_workdir, tmp_path):
  config = _config()
  workdir = tmp_path / "w"
  (workdir / "data").parent.mkdir(parents=True)
  os.symlink(base_workdir / "data", workdir / "data")
  _write_buffer(config, workdir, [range(0, 2)])  # 4 records so far
  model = TextToImage(config)
  make = lambda: data_lib.BufferStream(
      experts_stage.buffer_dir(workdir), batch_size=2, seed=0,
      transform=data_lib.make_example(model, 3, 0.3, 0.3, config.image_size))
  stream = make()
  first = [next(stream) for _ in range(2)]  # one pass over 4 records
  assert stream.get_state()["num_records"] == 4
  state = stream.get_state()
  writer = buffer_lib.BufferWriter(experts_stage.buffer_dir(workdir))
  assert writer.next_round() == 1
  _write_buffer_round(config, workdir, 1, range(2, 4))
  later = [next(stream) for _ in range(4)]
  assert stream.get_state()["num_records"] == 8 and stream.get_state()["pass"] == 1
  again = make()
  again.set_state(state)
  for a, b in zip(later, [next(again) for _ in range(4)]):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  # Every example: 3 demo slots; a subject's demos, dropped together or not at all.
  for batch in first + later:
    assert batch["demo_images"].shape == (2, 3, 16, 16, 3)
    assert batch["demo_mask"].all(axis=1).sum() + (~batch["demo_mask"]).all(axis=1).sum() == 2


def test_an_empty_buffer_is_a_clear_error(base_workdir, tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  for name in ("data", "pretrain"):
    os.symlink(base_workdir / name, workdir / name)
  (workdir / "experts").mkdir()
  (workdir / "experts" / "summary.json").write_text("{}")
  with pytest.raises(data_lib.EmptyBufferError, match="experts stage finished.*delta_clip"):
    stage.run(_config(), workdir)


# ------------------------------------------------------------------------------ the CLI

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "suti.generate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def test_generate_cli_writes_images_and_names_bad_input(trained, tmp_path):
  config, workdir, _ = trained
  demos = []
  for i, image in enumerate(_demos(3, size=20)):
    demos.append(tmp_path / f"demo{i}.png")
    train_lib.save_grid(demos[-1], image[None], columns=1, upscale=1)
  out = tmp_path / "out"
  args = [f"--checkpoint={stage.checkpoint_dir(workdir)}", *[f"--demo={d}" for d in demos],
          "--prompt=a red ball in the snow", "--num_images=2", "--seed=0", "--steps=3",
          "--finetune_steps=2", f"--out={out}"]
  result = _cli(*args)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["images"] == [str(out / f"sample_{i}.png") for i in range(2)]
  assert report["finetune_steps"] == 2
  assert (out / "grid.png").exists()
  # Bad input: named, exit code 2, no traceback.
  (tmp_path / "bad.png").write_text("nope")
  result = _cli(*args[:1], f"--demo={tmp_path / 'bad.png'}", "--prompt=a ball", f"--out={out}")
  assert result.returncode == 2 and "bad.png" in result.stderr
  assert "Traceback" not in result.stderr
  result = _cli(f"--checkpoint={tmp_path / 'nowhere'}", f"--demo={demos[0]}", "--prompt=a ball",
                f"--out={out}")
  assert result.returncode == 2 and "nowhere" in result.stderr


# ------------------------------------------------------------------------------ export

def test_export_then_generate_from_the_export_alone(trained, tmp_path):
  from apprentice import export  # pylint: disable=import-outside-toplevel
  config, workdir, _ = trained
  summary = export.run(config, workdir)
  assert summary["step"] == 12 and export.run(config, workdir) == summary  # then skipped
  moved = tmp_path / "moved"  # the export, away from its workdir
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(export.stage_dir(workdir), moved)
  exported = gen.load(moved / "checkpoint")
  original = gen.load(stage.checkpoint_dir(workdir))
  jax.tree.map(np.testing.assert_array_equal, exported[1], original[1])
  demos = _demos(3)
  a = gen.generate(*exported, demos, "a red ball in the snow", num_images=1, steps=3)
  b = gen.generate(*original, demos, "a red ball in the snow", num_images=1, steps=3)
  np.testing.assert_array_equal(a, b)
  assert json.loads((moved / "config.json").read_text())["image_size"] == config.image_size
  # No optimizer state or data position: just what generation needs.
  step_dir = moved / "checkpoint" / "12"
  assert (step_dir / "params").is_dir() and not (step_dir / "opt_state").exists()
