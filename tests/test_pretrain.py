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
from tests.conftest import REPO, load_config


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


def test_the_demo_starts_from_its_embedded_base(tmp_path):
  """configs/demo.py's shipped base fits its model, says how it was made, and remakes with
  configs/world_base.py, whose pre-training is the demo's own."""
  config = load_config("demo")
  assert config.pretrain.base_checkpoint == "embedded:world_base_16"
  summary = pretrain.run(config, tmp_path)
  assert summary["trained"] is False and not (tmp_path / "pretrain").exists()
  assert summary["params"] == 1396387
  assert summary["provenance"]["steps"] == config.pretrain.num_steps
  assert "configs/world_base.py" in summary["provenance"]["made_by"]
  remake = load_config("world_base")
  assert remake.pretrain.base_checkpoint == "" and remake.stages == "data,pretrain"
  assert remake.pretrain.to_dict() == dict(config.pretrain.to_dict(), base_checkpoint="")
  # Its params are real weights, not an initialisation: the checkpoint's step is the run's.
  with checkpoint.Checkpoints(pretrain.base_checkpoint_dir(config, tmp_path),
                              read_only=True) as ckpt:
    assert ckpt.latest_step() == config.pretrain.num_steps
  assert load_config("demo", "32").pretrain.base_checkpoint == ""  # none shipped at 32x32
  config.pretrain.base_checkpoint = "embedded:world_base_99"
  with pytest.raises(config_lib.InputError, match="embedded bases: \\['world_base_16'\\]"):
    pretrain.load_base(config, tmp_path)


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
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
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
