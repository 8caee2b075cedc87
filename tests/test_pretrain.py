"""Stage pretrain: it learns, it resumes to the bit, it is data-parallel, it can be skipped."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from suti import checkpoint, config_lib, pretrain, train_lib
from suti.data import builder
from suti.data import world as world_lib
from tests.conftest import REPO, device_flags, load_config


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory):
  """A workdir holding the tiny world dataset, linked into each test's own workdir."""
  workdir = tmp_path_factory.mktemp("data")
  builder.build(config_lib.validate(load_config("tiny")), workdir / "data")
  return workdir


def _workdir(data_workdir, tmp_path):
  tmp_path.mkdir(parents=True, exist_ok=True)
  (tmp_path / "data").symlink_to(data_workdir / "data", target_is_directory=True)
  return tmp_path


def _losses(workdir) -> dict[int, float]:
  """step -> loss; a resumed run re-logs steps after its checkpoint, the last entry wins."""
  return {m["step"]: m["loss"] for m in train_lib.read_metrics(workdir / "pretrain" / "logs")}


def _config(**pretrain_overrides):
  config = load_config("tiny")
  config.pretrain.log_every = 1
  config.pretrain.sample_every = 1000
  for key, value in pretrain_overrides.items():
    config.pretrain[key] = value
  return config_lib.validate(config)


def test_loss_decreases_and_outputs_exist(data_workdir, tmp_path):
  workdir = _workdir(data_workdir, tmp_path)
  config = _config(num_steps=40, learning_rate=2e-3)
  summary = pretrain.run(config, workdir)
  losses = [loss for _, loss in sorted(_losses(workdir).items())]
  assert len(losses) == 40
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
  assert summary["steps"] == 40 and summary["params"] > 0
  out = workdir / "pretrain"
  assert (out / "samples" / "step_000040.png").exists()
  assert list((out / "logs").glob("events.out.tfevents.*"))
  # Complete: a second run returns the stored summary without training.
  assert pretrain.run(config, workdir) == summary


def test_resume_continues_the_same_loss_curve(data_workdir, tmp_path):
  straight = _workdir(data_workdir, tmp_path / "straight")
  pretrain.run(_config(num_steps=12, checkpoint_every=6), straight)
  interrupted = _workdir(data_workdir, tmp_path / "interrupted")
  pretrain.run(_config(num_steps=6, checkpoint_every=6), interrupted)   # stops at 6
  pretrain.run(_config(num_steps=12, checkpoint_every=6), interrupted)  # resumes at 6
  assert _losses(interrupted) == _losses(straight)  # the same numbers, bit for bit
  params = [checkpoint.load_params(w / "pretrain" / "checkpoints") for w in (straight,
                                                                            interrupted)]
  jax.tree.map(np.testing.assert_array_equal, *params)


def test_continue_base_resumes_a_base_with_a_fresh_optimizer(data_workdir, tmp_path):
  # benchmarks/continue_base.py: how world_base_16_v3 was made from the v2 asset, which keeps
  # params only. The new workdir resumes at the base's step with the base's params.
  sys.path.insert(0, str(REPO / "benchmarks"))
  import continue_base  # pylint: disable=import-outside-toplevel
  source = _workdir(data_workdir, tmp_path / "source")
  pretrain.run(_config(num_steps=6, checkpoint_every=6), source)
  base = source / "pretrain" / "checkpoints"
  target = _workdir(data_workdir, tmp_path / "target")
  config = _config(num_steps=10, checkpoint_every=10)
  assert continue_base.seed_workdir(config, str(base), target) == 6
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(base),
               checkpoint.load_params(target / "pretrain" / "checkpoints"))
  summary = pretrain.run(config, target)
  assert summary["steps"] == 10 and sorted(_losses(target)) == [7, 8, 9, 10]
  with pytest.raises(SystemExit, match="exists"):  # never over a workdir's own checkpoints
    continue_base.seed_workdir(config, str(base), target)


class _CaptionRecorder:
  """Stands in for TextToImage.tokenize and keeps every caption it was given."""

  def __init__(self):
    self.captions = []

  def tokenize(self, captions):
    self.captions += list(captions)
    return {"ids": np.zeros((1, 4), np.int32), "mask": np.ones((1, 4), bool)}


def test_oracle_fraction_mixes_in_renders_of_the_whole_grammar():
  config = _config(oracle_fraction=0.5, oracle_subjects=64)
  world = world_lib.from_config(config)
  subjects = pretrain.oracle_subjects(config, world)
  assert len(subjects) == 64 and {s.split for s in subjects} == {"train"}
  assert pretrain.oracle_subjects(_config(), world) == []  # the default: the dataset's pairs
  recorder = _CaptionRecorder()
  transform = pretrain.make_transform(recorder, 0.0, world, subjects, 0.5)
  size = config.image_size
  record = {"image": np.zeros((size, size, 3), np.uint8), "caption": "a star on the grass"}
  examples = [transform(record, np.random.default_rng(i)) for i in range(400)]
  oracle = [(e, c) for e, c in zip(examples, recorder.captions) if c != record["caption"]]
  assert 0.42 < len(oracle) / len(examples) < 0.58
  scenes = [world.parse_prompt(c) for _, c in oracle]
  for skill in ("color", "accessory", "style"):  # what the dataset's captions never ask
    assert np.mean([getattr(s, skill) is not None for s in scenes]) > 0.15, skill
  # Each replaced pair is a render of its caption, not the record's image.
  for example, _ in oracle:
    assert example["image"].shape == (size, size, 3) and example["image"].std() > 0.05
  for example, caption in zip(examples, recorder.captions):
    if caption == record["caption"]:
      np.testing.assert_array_equal(example["image"], -1.0)
  # With a caption dropout the oracle's captions are dropped too, at the same rate.
  recorder = _CaptionRecorder()
  transform = pretrain.make_transform(recorder, 0.5, world, subjects, 1.0)
  for i in range(200):
    transform(record, np.random.default_rng(i))
  assert 0.38 < recorder.captions.count("") / 200 < 0.62
  assert record["caption"] not in recorder.captions


def test_cosine_schedule_warms_up_then_decays_to_zero():
  """Adam's step is the learning rate: it rises over warmup_steps, then with lr_schedule
  'cosine' falls to zero at num_steps; 'constant' stays at the peak."""
  params = {"w": np.zeros(3, np.float32)}
  grads = {"w": np.full(3, 1e-3, np.float32)}  # under the norm clip
  steps = {}
  for schedule in ("constant", "cosine"):
    pc = _config(lr_schedule=schedule, learning_rate=1e-2, warmup_steps=4,
                 num_steps=12).pretrain
    tx = pretrain.make_optimizer(pc)
    state, sizes = tx.init(params), []
    for _ in range(pc.num_steps + 1):
      updates, state = tx.update(grads, state, params)
      sizes.append(float(np.abs(updates["w"]).mean()))
    steps[schedule] = np.array(sizes)
  for sizes in steps.values():
    np.testing.assert_allclose(sizes[:5], [0, 2.5e-3, 5e-3, 7.5e-3, 1e-2], rtol=1e-3, atol=1e-9)
  np.testing.assert_allclose(steps["constant"][4:], 1e-2, rtol=1e-3)
  np.testing.assert_allclose(steps["cosine"][8], 5e-3, rtol=1e-3)  # half way down
  assert steps["cosine"][-1] < 1e-9 and np.all(np.diff(steps["cosine"][4:]) < 0)


def test_base_checkpoint_is_used_instead_of_training(data_workdir, tmp_path):
  trained = _workdir(data_workdir, tmp_path / "trained")
  pretrain.run(_config(num_steps=2), trained)
  config = _config()
  config.pretrain.base_checkpoint = str(trained / "pretrain" / "checkpoints")
  other = _workdir(data_workdir, tmp_path / "other")
  summary = pretrain.run(config, other)
  assert summary["trained"] is False and not (other / "pretrain").exists()
  _, params, _ = pretrain.load_base(config, other)
  jax.tree.map(np.testing.assert_array_equal, params,
               checkpoint.load_params(trained / "pretrain" / "checkpoints"))
  config.pretrain.base_checkpoint = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="missing"):
    pretrain.load_base(config, other)


def test_a_base_from_another_model_is_refused_naming_the_field(data_workdir, tmp_path):
  trained = _workdir(data_workdir, tmp_path / "trained")
  pretrain.run(_config(num_steps=2), trained)
  config = _config()
  config.pretrain.base_checkpoint = str(trained / "pretrain" / "checkpoints")
  config.model.dtype = "bfloat16"  # a run-time setting: the same weights fit
  config.diffusion.dynamic_threshold_percentile = 0.99
  pretrain.load_base(config, tmp_path)
  config.diffusion.prediction = "eps" if config.diffusion.prediction == "v" else "v"
  with pytest.raises(config_lib.InputError, match=r"diffusion\.prediction: checkpoint"):
    pretrain.load_base(config, tmp_path)


def test_a_frozen_world_text_encoder_stays_at_its_fixed_initialisation(data_workdir, tmp_path):
  trained = _workdir(data_workdir, tmp_path / "trained")
  config = _config(num_steps=3, learning_rate=2e-3)
  config.model.text_encoder.freeze = True
  model = pretrain.TextToImage(config)
  trainable, frozen = model.init(jax.random.PRNGKey(1))
  assert "text" not in trainable and set(frozen) == {"text"}
  # A function of the config alone: another seed, or another process, rebuilds the weights.
  jax.tree.map(np.testing.assert_array_equal, frozen,
               pretrain.TextToImage(config).init(jax.random.PRNGKey(2))[1])
  jax.tree.map(np.testing.assert_array_equal, frozen, model.frozen_params())

  pretrain.run(config, trained)
  saved = checkpoint.load_params(trained / "pretrain" / "checkpoints")
  assert "text" not in saved  # nothing of the encoder trained, so nothing of it is saved
  config.pretrain.base_checkpoint = str(trained / "pretrain" / "checkpoints")
  _, params, loaded_frozen = pretrain.load_base(config, tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded_frozen, frozen)
  jax.tree.map(np.testing.assert_array_equal, params, saved)
  # The base's UNet learnt to read that encoder: a trained one would be another model.
  config.model.text_encoder.freeze = False
  with pytest.raises(config_lib.InputError, match=r"model\.text_encoder\.freeze: checkpoint"):
    pretrain.load_base(config, tmp_path)


@pytest.mark.parametrize("name,asset,params,steps", [("demo", "world_base_16_v3", 1304611, 15000),
                                                     ("bench", "world_base_16", 1396387, 2500)])
def test_the_demo_and_the_bench_start_from_their_embedded_bases(tmp_path, name, asset, params,
                                                                steps):
  """configs/demo.py's shipped base (v3) and configs/bench.py's (the demo's earlier one, which
  its results were measured on) fit their models, say how they were made, and remake with
  configs/world_base.py (the demo's pre-training; the earlier base with the overrides its
  asset.json names)."""
  config = load_config(name)
  assert config.pretrain.base_checkpoint == f"embedded:{asset}"
  summary = pretrain.run(config, tmp_path)
  assert summary["trained"] is False and not (tmp_path / "pretrain").exists()
  assert summary["params"] == params
  # v3 is a 16000-step cosine run stopped at step 15000 (its rate there is 1% of the peak).
  assert summary["provenance"]["steps"] == steps <= config.pretrain.num_steps
  assert "configs/world_base.py" in summary["provenance"]["made_by"]
  # Its params are real weights, not an initialisation: the checkpoint's step is the run's.
  with checkpoint.Checkpoints(pretrain.base_checkpoint_dir(config, tmp_path),
                              read_only=True) as ckpt:
    assert ckpt.latest_step() == steps
  remake = load_config("world_base")
  if name == "bench":  # the earlier base: world_base.py with the overrides its asset.json names
    for override in ("text_encoder.freeze=False", "cross_attention_resolutions=(8,4)",
                     "pretrain.num_steps=2500"):
      assert override in summary["provenance"]["made_by"]
    remake.model.text_encoder.freeze = False
    remake.model.cross_attention_resolutions = (8, 4)
    remake.pretrain.num_steps = 2500
  assert remake.pretrain.base_checkpoint == "" and remake.stages == "data,pretrain"
  assert remake.pretrain.to_dict() == dict(config.pretrain.to_dict(), base_checkpoint="")
  assert remake.model.to_dict() == config.model.to_dict()
  if name == "bench":
    return
  assert load_config("demo", "32").pretrain.base_checkpoint == ""  # none shipped at 32x32
  config.pretrain.base_checkpoint = "embedded:world_base_99"
  with pytest.raises(config_lib.InputError, match="pretrain.base_checkpoint 'embedded:world_base"
                     "_99': no embedded model 'world_base_99'.*embedded models: .*'world_base_16'"):
    pretrain.load_base(config, tmp_path)


@pytest.mark.parametrize("name,num_steps,steps", [("world_base_16_v2", 5000, 5000),
                                                    ("world_base_16_v3", 16000, 15000)])
def test_the_candidate_base_loads_with_its_own_model_and_reads_its_prompts(tmp_path, name,
                                                                          num_steps, steps):
  """embedded:world_base_16_v2 (world text encoder frozen, text attention also at 16x16,
  5000 steps) and v3 (the same pre-trained to step 15000 of a 16000-step run) load with the
  model fields their asset.json's command names (the demo's since v3), are refused with the
  earlier base's (configs/bench.py) naming the field, and are trained bases: on oracle renders
  of held-out subjects the loss is far below a fresh initialisation's, and below the base's
  own with the prompts of other scenes (its frozen text encoder must be the one it trained
  with)."""
  earlier = load_config("bench")
  earlier.pretrain.base_checkpoint = f"embedded:{name}"
  with pytest.raises(config_lib.InputError, match=r"model\..*checkpoint"):
    pretrain.load_base(earlier, tmp_path)
  config = load_config("demo")
  config.pretrain.base_checkpoint = f"embedded:{name}"
  config.pretrain.num_steps = num_steps
  summary = pretrain.run(config, tmp_path)
  made_by = summary["provenance"]["made_by"]
  for override in ("text_encoder.freeze=True", "cross_attention_resolutions=(16,8,4)",
                   f"pretrain.num_steps={num_steps}"):
    assert override in made_by
  assert summary["provenance"]["steps"] == steps and summary["trained"] is False

  model, trainable, frozen = pretrain.load_base(config, tmp_path)
  world = world_lib.from_config(config)
  rng = np.random.default_rng(0)
  subjects = world.subjects("eval", 16)
  scenes = [world_lib.random_scene(rng) for _ in subjects]
  prompts = [world_lib.format_prompt(s.category, scene) for s, scene in zip(subjects, scenes)]
  images = train_lib.to_model_space(np.stack([world.render(s, p, seed=i)[0] for i, (s, p) in
                                               enumerate(zip(subjects, prompts))]))
  loss = jax.jit(model.loss)  # one compile for the three params and prompt sets below

  def world_loss(trainable, frozen, prompts) -> float:
    """The denoising loss on `images` captioned `prompts`, with fixed noise and timesteps."""
    batch = dict(model.tokenize(prompts), image=images)
    return float(loss(trainable, frozen, batch, jax.random.PRNGKey(7)))

  trained = world_loss(trainable, frozen, prompts)
  fresh = world_loss(*model.init(jax.random.PRNGKey(1)), prompts)
  shifted = world_loss(trainable, frozen, prompts[1:] + prompts[:1])
  assert trained < 0.5 * fresh, (trained, fresh)
  assert trained < 0.6 * shifted, (trained, shifted)


_DATA_PARALLEL = """
import json, sys
import jax
from suti import config_lib, pretrain, train_lib
from tests.conftest import load_config
config = load_config("tiny")
config.pretrain.num_steps, config.pretrain.log_every, config.pretrain.sample_every = 4, 1, 1000
config.mesh.data = int(sys.argv[2])
summary = pretrain.run(config_lib.validate(config), sys.argv[1])
losses = {m["step"]: m["loss"] for m in train_lib.read_metrics(sys.argv[1] + "/pretrain/logs")}
print(json.dumps({"devices": summary["devices"], "losses": losses}))
"""


def test_data_parallel_matches_one_device(data_workdir, tmp_path):
  results = {}
  for devices in (1, 2):
    workdir = _workdir(data_workdir, tmp_path / f"d{devices}")
    env = dict(os.environ, XLA_FLAGS=device_flags(2),
               PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _DATA_PARALLEL, str(workdir), str(devices)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results[devices] = json.loads(out.stdout.strip().splitlines()[-1])
  assert results[2]["devices"] == 2 and results[1]["devices"] == 1
  one, two = results[1]["losses"], results[2]["losses"]
  assert one.keys() == two.keys()
  # Same batches and noise; only the order of the gradient all-reduce differs.
  np.testing.assert_allclose([two[k] for k in two], [one[k] for k in one], rtol=2e-4)


def test_batch_must_divide_devices(data_workdir, tmp_path):
  config = _config()
  config.pretrain.batch_size = 3
  config.mesh.data = 1
  workdir = _workdir(data_workdir, tmp_path)
  # One device divides everything; the check is exercised through mesh size in the subprocess
  # test above. Here: a nonsensical mesh size is refused before training.
  config.mesh.data = 5
  with pytest.raises(ValueError, match="5"):
    pretrain.run(config, workdir)


def test_sample_grids_upscale_small_images_to_64_pixels(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  grid = train_lib.save_grid(tmp_path / "g.png", images, columns=3)
  # 16 px tiles x4 (nearest), 1 px padding between tiles.
  assert grid.shape[0] >= 2 * 64 and grid.shape[1] >= 3 * 64
  assert (grid[1:5, 1:5] == images[0, 0, 0]).all() and (grid[5, 5] == images[0, 1, 1]).all()
  assert train_lib.save_grid(tmp_path / "h.png", np.zeros((2, 64, 64, 3), np.uint8),
                             columns=2).shape[0] < 2 * 64
