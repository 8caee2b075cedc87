"""Packed experts: they specialise, the device layout does not matter, NaNs stay contained.

Multi-device checks run in a child Python with fake CPU devices (XLA_FLAGS only takes effect
before jax is imported; the rest of the suite runs on one device) that prints one JSON line.
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experts import parallel
from suti import config_lib, plan, train_lib
from suti.data import builder, pipeline
from suti.data.types import SubjectCluster
from suti.model import TextToImage
from tests.conftest import REPO, device_flags, load_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny world dataset: 8 training subjects of 3-4 images."""
  out = tmp_path_factory.mktemp("experts_data") / "data"
  builder.build(config_lib.validate(load_config("tiny")), out)
  return out


def _run(script, devices, *args):
  env = {**os.environ, "XLA_FLAGS": device_flags(devices),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# The check: 4 devices x 2 experts, 8 subjects. A randomly initialised base first
# learns to denoise anything, so each expert needs enough steps at a high learning rate for
# what it memorises of its own 3-4 images to show; the losses use the same (t, noise) for
# every expert, so the comparison is paired.
_SPECIALISE = """
  import json, sys
  import jax, numpy as np
  from experts import parallel
  from suti import diffusion, mesh as mesh_lib
  from suti.data import pipeline
  from suti.model import TextToImage
  from tests.conftest import load_config

  config = load_config("tiny")
  ec = config.experts
  ec.num_experts, ec.experts_per_device = 8, 2
  ec.num_steps, ec.batch_size, ec.learning_rate = int(sys.argv[2]), 4, float(sys.argv[3])
  assert jax.device_count() == 4
  mesh = mesh_lib.make_mesh("expert", 4)
  clusters = list(pipeline.ClusterSource(sys.argv[1], "train"))
  assert len(clusters) == 8
  model = TextToImage(config)
  base_unet, shared = parallel.split_base(*model.init(jax.random.PRNGKey(0)))
  stacked, losses, finite = parallel.finetune(config, model, base_unet, shared, clusters, 0,
                                              mesh)
  assert stacked["cond"]["time_mlp_0"]["kernel"].sharding.spec[0] == "expert"
  stacked = jax.device_get(stacked)

  # Loss matrix [expert, cluster] at fixed (t, noise): R examples per cluster, its images
  # cycled, one draw per cluster shared by all experts.
  R = 48
  arrays = parallel.cluster_arrays(clusters, model.tokenize)

  @jax.jit
  def loss(unet, batch, key):
    cond = model.encode(dict(shared["trainable"], unet=unet), shared["frozen"], batch)
    t_key, n_key = jax.random.split(key)
    t = jax.random.randint(t_key, (R,), 0, model.schedule.num_steps)
    noise = jax.random.normal(n_key, batch["image"].shape)
    return diffusion.loss_at(model.schedule, model.denoise_fn, unet, batch["image"], cond, t,
                             noise, model.prediction).mean()

  matrix = np.zeros((8, 8))
  for j, a in enumerate(arrays):
    batch = {k: v[np.arange(R) % len(v)] for k, v in a.items()}
    for k in range(8):
      matrix[k, j] = loss(parallel.unstack_expert(stacked, k), batch, jax.random.PRNGKey(j))
  leaves = [np.asarray(x).reshape(8, -1) for x in jax.tree.leaves(stacked)]
  flat = np.concatenate(leaves, axis=1)
  distance = np.abs(flat[:, None] - flat[None]).max(-1)
  print(json.dumps({"losses": losses.tolist(), "finite": finite.tolist(),
                    "matrix": matrix.tolist(), "distance": distance.tolist()}))
"""


def test_eight_experts_on_four_devices_specialise(data_dir):
  out = _run(_SPECIALISE, 4, data_dir, 50, 3e-3)
  assert all(out["finite"]) and np.all(np.isfinite(out["losses"])), out
  distance = np.asarray(out["distance"])
  off_diagonal = distance[~np.eye(8, dtype=bool)]
  assert off_diagonal.min() > 1e-4, distance  # eight different experts
  matrix = np.asarray(out["matrix"])
  own = np.diag(matrix)
  others = (matrix.sum(1) - own) / 7
  assert np.all(own < others), (own, others, matrix)


_LAYOUT = """
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from experts import parallel
  from suti import mesh as mesh_lib
  from suti.data import pipeline
  from suti.model import TextToImage
  from tests.conftest import load_config

  config = load_config("tiny")
  config.experts.num_experts, config.experts.num_steps = 4, 4
  clusters = list(pipeline.ClusterSource(sys.argv[1], "train"))[:4]
  model = TextToImage(config)
  base_unet, shared = parallel.split_base(*model.init(jax.random.PRNGKey(0)))
  base_unet = jax.device_get(base_unet)
  key = jax.random.PRNGKey(1)
  x = jax.random.normal(key, (2, 16, 16, 3))
  cond = model.encode(dict(shared["trainable"], unet=base_unet), shared["frozen"],
                      model.tokenize(["a ball", "a cat on the grass"]))
  denoise = jax.jit(lambda unet: model.denoise_fn(unet, x, jnp.array([10, 80]), cond))
  results = {}
  for devices, per_device in ((1, 4), (2, 2)):
    config.experts.experts_per_device = per_device
    mesh = mesh_lib.make_mesh("expert", devices)
    losses = []
    stacked, _, _ = parallel.finetune(config, model, base_unet, shared, clusters, 1, mesh,
                                      callback=lambda step, l: losses.append(np.asarray(l)))
    assert stacked["cond"]["time_mlp_0"]["kernel"].sharding.num_devices == devices
    stacked = jax.device_get(stacked)
    outputs = [np.asarray(denoise(parallel.unstack_expert(stacked, k))) for k in range(4)]
    results[devices] = (stacked, np.stack(losses), np.stack(outputs))
  (one, one_losses, one_out), (two, two_losses, two_out) = results[1], results[2]
  diff = sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)))
  update = sum(np.sum((a - b[None]) ** 2)
               for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(base_unet)))
  print(json.dumps({"losses": [one_losses.tolist(), two_losses.tolist()],
                    "outputs": [one_out.tolist(), two_out.tolist()],
                    "param_diff": float(np.sqrt(diff)), "update": float(np.sqrt(update))}))
"""


def test_layout_does_not_change_the_experts(data_dir):
  """1 device x 4 experts and 2 devices x 2 experts train the same four experts.

  Compared as functions (per-step losses, denoiser outputs): the params themselves differ a
  little where the loss cannot see them (a bias right before a GroupNorm has zero gradient,
  and Adafactor scales the float noise of the two layouts up to lr-sized steps).
  """
  out = _run(_LAYOUT, 2, data_dir)
  one_losses, two_losses = map(np.asarray, out["losses"])
  assert one_losses.shape == (4, 4) and np.isfinite(one_losses).all()
  np.testing.assert_allclose(two_losses, one_losses, rtol=2e-5)
  one_out, two_out = map(np.asarray, out["outputs"])
  assert not np.allclose(one_out[0], one_out[1])  # different experts
  np.testing.assert_allclose(two_out, one_out, atol=1e-4 * np.abs(one_out).max())
  assert out["update"] > 0 and out["param_diff"] < 0.1 * out["update"], out


# ------------------------------------------------------------------------- one device

def _clusters(data_dir, n):
  return list(pipeline.ClusterSource(data_dir, "train"))[:n]


def _setup(num_experts=2, **experts):
  config = load_config("tiny")
  config.experts.num_experts = num_experts
  config.experts.update(experts)
  model = TextToImage(config)
  unet, shared = parallel.split_base(*model.init(jax.random.PRNGKey(0)))
  return config, model, unet, shared


def test_nan_in_one_expert_keeps_its_params_and_not_the_others(data_dir):
  config, model, unet, shared = _setup(2)
  ec = config.experts  # the step finetune() compiles, so the two tests share one compile
  tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
  stacked = parallel.stack_experts(unet, 2)
  opt_state = parallel.init_opt_state(tx, stacked)
  before = jax.device_get((stacked, opt_state))  # the step donates its inputs
  step_fn = parallel.make_expert_train_step(model, tx, config.seed)
  batch = parallel.expert_batches(_clusters(data_dir, 2), ec.batch_size, 0, 0, 0,
                                  tokenize=model.tokenize)
  batch["image"][1, 0, 3, 3, 0] = np.nan  # one pixel of expert 1's batch
  new, new_opt, losses = step_fn(stacked, opt_state, shared, jax.device_put(batch), 0,
                                 jax.device_put(np.arange(2, dtype=np.int32)), 0)
  losses = np.asarray(losses)
  assert np.isfinite(losses[0]) and np.isnan(losses[1]), losses
  after = jax.device_get((new, new_opt))
  for old_leaf, new_leaf in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(new_leaf[1], old_leaf[1])  # expert 1: untouched
  moved = [float(np.abs(n[0] - o[0]).max())
           for o, n in zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0]))]
  assert max(moved) > 0  # expert 0 trained
  assert all(np.isfinite(x[0]).all() for x in jax.tree.leaves(after))


def test_finetune_and_sample_pads_and_samples(data_dir):
  """One real subject in a round of two slots: the padding slot is trained and dropped."""
  config, model, unet, shared = _setup(2, num_steps=1, sample_steps=3, samples_per_prompt=2)
  clusters = _clusters(data_dir, 1)
  calls = []
  images, losses, finite = parallel.finetune_and_sample(
      config, model, unet, shared, clusters, 0, callback=lambda step, l: calls.append(step))
  assert images.shape == (1, 2, 16, 16, 3) and images.dtype == np.uint8
  assert losses.shape == (1,) and np.isfinite(losses).all() and finite.tolist() == [True]
  assert calls == [0]
  # The sampler itself: [-1, 1] floats, one row of images per expert and per prompt slot.
  sample = parallel.sampler_from_config(model, config)
  tokens = model.tokenize(["a ball", "a ball on the grass"])
  tokens = {k: np.stack([v, v]) for k, v in tokens.items()}  # [K=2, S=2, L]
  stacked = parallel.stack_experts(unet, 2)
  out = np.asarray(sample(stacked, shared, tokens, jax.random.PRNGKey(0), np.arange(2)))
  assert out.shape == (2, 2, 16, 16, 3) and out.dtype == np.float32
  assert np.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
  # Same params and prompts: only the expert id (its noise) tells the two slots apart.
  assert not np.allclose(out[0], out[1])
  with pytest.raises(ValueError, match="same number"):
    parallel.finetune_and_sample(config, model, unet, shared, clusters, 0,
                                 prompts=[["a ball"], ["a cat"]])


# ------------------------------------------------------------------------- host side

def test_expert_batches_are_deterministic_and_per_expert(data_dir):
  clusters = _clusters(data_dir, 3)
  model = TextToImage(load_config("tiny"))
  arrays = parallel.cluster_arrays(clusters, model.tokenize)
  batch = parallel.expert_batches(arrays, 5, step=7, seed=0, round_=2)
  assert batch["image"].shape == (3, 5, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["ids"].shape[:2] == (3, 5) and batch["mask"].dtype == bool
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  for k, arr in enumerate(arrays):  # every example is one of the expert's own pairs
    for image, ids in zip(batch["image"][k], batch["ids"][k]):
      i = int(np.argmin(np.abs(arr["image"] - image).reshape(len(arr["image"]), -1).sum(1)))
      np.testing.assert_array_equal(arr["image"][i], image)
      np.testing.assert_array_equal(arr["ids"][i], ids)
  same = parallel.expert_batches(clusters, 5, step=7, seed=0, round_=2, tokenize=model.tokenize)
  jax.tree.map(np.testing.assert_array_equal, batch, same)
  # Expert 1 draws the same whichever slot list it is in (layout independence on the host).
  alone = parallel.expert_batches(arrays[1:2], 5, step=7, seed=0, round_=2, expert_ids=[1])
  np.testing.assert_array_equal(alone["image"][0], batch["image"][1])
  draws = [parallel.expert_batches(arrays, 3, step=s, seed=0, round_=r)["image"]
           for s, r in ((0, 0), (1, 0), (0, 1))]
  assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])
  with pytest.raises(ValueError, match="tokenize"):
    parallel.expert_batches(clusters, 2, 0, 0, 0)


def test_layout_and_padding_rules():
  assert parallel.layout(8, 4) == (2, 8)
  assert parallel.layout(7, 4) == (2, 8)
  assert parallel.layout(400, 400, 1) == (1, 400)
  with pytest.raises(ValueError, match="experts_per_device=1"):
    parallel.layout(8, 4, 1)
  assert parallel.pad_to([1, 2], 4) == [1, 2, 2, 2]
  with pytest.raises(ValueError, match="do not fit"):
    parallel.pad_to([1, 2, 3], 2)
  assert parallel.resolve_pack("auto", 4, "cpu") == "split"
  assert parallel.resolve_pack("auto", 4, "tpu") == "vmap"
  assert parallel.resolve_pack("vmap", 1) == "unroll"
  with pytest.raises(ValueError, match="pack"):
    parallel.resolve_pack("bogus", 2)
  cluster = SubjectCluster("s", "ball", [np.zeros((4, 4, 3), np.uint8)], ["a ball"], [])
  assert parallel.default_prompts([cluster]) == [["a ball"]]


def test_split_convolutions_match_grouped_and_restore_the_rule():
  """'split' gives the grouped convolution's numbers, and leaves jax's rule as it found it."""
  kernels = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 3, 4, 5))
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 8, 8, 4))

  def loss(kernel, x):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jnp.tanh(y) ** 2)

  fn = jax.value_and_grad(loss)
  table, prim = parallel._conv_batchers()  # pylint: disable=protected-access
  rule = table[prim]
  grouped = jax.jit(parallel._packed(fn, "vmap", (0, 0)))  # pylint: disable=protected-access
  split = jax.jit(parallel._packed(fn, "split", (0, 0)))  # pylint: disable=protected-access
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               split(kernels, images), grouped(kernels, images))
  assert "feature_group_count = 3" not in split.lower(kernels, images).as_text()
  assert "feature_group_count = 3" in grouped.lower(kernels, images).as_text()
  assert table[prim] is rule


def test_finite_guard_flags_each_expert_and_is_compiled_once_not_per_leaf():
  """The NaN guard's flag, vmapped over experts, marks only the expert with a NaN or inf; in
  the compiled program it is computed once, not re-fused into each leaf's select: with a
  boolean reduction XLA made 40 x 40 'and' instructions for 40 leaves (a packed UNet step
  took minutes to compile), with the dot it makes one per leaf."""
  tree = {f"w{i:02d}": jnp.ones((3, 3, 5)) for i in range(40)}
  tree["w07"] = tree["w07"].at[1, 2, 4].set(jnp.nan).at[2, 0, 0].set(jnp.inf)
  flags = jax.jit(jax.vmap(parallel._tree_all_finite))(tree)  # pylint: disable=protected-access
  assert flags.tolist() == [True, False, False]

  def guard(t):
    ok = parallel._tree_all_finite(t)  # pylint: disable=protected-access
    return jax.tree.map(lambda x: jnp.where(ok, x * 0.5, x), t)

  compiled = jax.jit(jax.vmap(guard)).lower(tree).compile().as_text()
  assert compiled.count(" and(") <= 2 * len(tree), compiled.count(" and(")


def test_round_functions_are_shared_by_models_of_one_config():
  """evaluate loads its own base model; its experts must not recompile the experts' step."""
  config = load_config("tiny")
  first = parallel.round_functions(config, TextToImage(config))
  assert parallel.round_functions(config, TextToImage(config)) is first
  other = load_config("tiny")
  other.model.channels = 8
  assert parallel.round_functions(other, TextToImage(other)) is not first


# ------------------------------------------------------------------------- plan

def test_plan_rows_are_abstract_and_registered():
  assert "experts.parallel:plan_rows" in plan.ROW_BUILDERS
  config = load_config("tiny")  # K = 4 experts
  ctx = plan.Context(num_devices=2, device_memory_bytes=2**30)
  train, sample = parallel.plan_rows(config, ctx)
  for program in (train, sample):
    assert program.model == "experts"
    leaves = jax.tree.leaves(program.args)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # no arrays
  unet_params = train.params // 2
  assert train.step == "expert_train" and train.info["experts_per_device"] == 2
  assert train.batch_per_device == 2 * config.experts.batch_size
  assert train.args[0]["cond"]["time_mlp_0"]["kernel"].shape[0] == 2
  assert sample.step == "expert_sample" and sample.info["guidance"] == 30.0
  assert sample.info["unet_batch"] == 2 * 2 * config.experts.samples_per_prompt
  assert sample.params == 2 * unet_params
  row = plan.measure(sample, ctx, compile_=False)  # lowered only: FLOPs of one guided step
  assert row["flops"] > 0 and row["batch_per_device"] == 2
  # The paper: one expert per device, whatever the plan's device count.
  paper = load_config("paper")
  assert parallel.device_experts(paper, 256) == 1
  assert parallel.device_experts(config, 3) == 2
