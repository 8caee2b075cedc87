"""Stage `plan`: AOT-compiled steps from abstract shapes, their FLOPs and bytes per device."""
import json

import jax
import jax.numpy as jnp
import pytest

from suti import plan
from suti.model import TextToImage
from suti.nn.unet import count_params
from tests.conftest import load_config


def tiny(**plan_keys):
  config = load_config("tiny")
  config.pretrain.batch_size = 8
  config.plan = dict({"num_devices": 1}, **plan_keys)
  return config


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("plan")
  summary = plan.run(tiny(), workdir)
  doc = json.loads((workdir / "plan.json").read_text())
  return summary, {(r["model"], r["step"]): r for r in doc["rows"]}, doc


def test_base_rows_and_params(planned):
  summary, rows, doc = planned
  assert set(rows) >= {("base", "pretrain_train"), ("base", "pretrain_sample")}
  assert summary["rows"]["base/pretrain_train"]["params"] == rows["base", "pretrain_train"][
      "params"]
  assert "CPU" in doc["caveat"]
  # The same count as a real init (UNet + the jointly trained world text encoder).
  trainable, _ = TextToImage(tiny()).init(jax.random.PRNGKey(0))
  assert rows["base", "pretrain_train"]["params"] == count_params(trainable)
  assert rows["base", "pretrain_sample"]["params"] == count_params(trainable["unet"])
  assert rows["base", "pretrain_train"]["batch_per_device"] == 8
  sample = rows["base", "pretrain_sample"]
  assert sample["unet_batch"] == 2 * sample["batch_per_device"]  # classifier-free guidance


def test_bytes_per_device_consistent(planned):
  _, rows, _ = planned
  for row in rows.values():
    b = row["bytes_per_device"]
    assert row["flops"] > 0
    assert b["argument"] >= 4 * row["params"]  # float32 params are arguments
    assert b["total"] == b["argument"] + b["output"] + b["temp"] - b["alias"]
    assert row["fits"] is (b["total"] <= row["device_memory_bytes"])
  train = rows["base", "pretrain_train"]["bytes_per_device"]
  # Params and optimizer state are donated: their output buffers alias the inputs.
  assert train["alias"] >= 4 * rows["base", "pretrain_train"]["params"]


def test_flops_scale_with_batch(planned):
  """2x batch -> ~2x FLOPs: the compiled sample step, and the train step lowered only (a
  second compile of the train step would double this file's time)."""
  _, rows, _ = planned
  config = tiny()
  config.pretrain.batch_size *= 2
  config.pretrain.num_samples *= 2
  ctx = plan.make_context(config)
  train, sample = plan.base_rows(config, ctx)
  for program, compile_ in ((sample, True), (train, False)):
    doubled = plan.measure(program, ctx, compile_=compile_)["flops"]
    ratio = doubled / rows["base", program.step]["flops"]
    assert 1.6 < ratio < 2.4, (program.step, ratio)


def test_fits_false_on_a_tiny_device(tmp_path, monkeypatch):
  # The base rows only: every builder's rows get `fits` the same way, and recompiling them
  # all again cost this file a minute.
  monkeypatch.setattr(plan, "ROW_BUILDERS", ["suti.plan:base_rows"])
  summary = plan.run(tiny(device_memory_gib=1e-6), tmp_path)  # ~1 KiB per device
  assert summary["rows"] and not any(r["fits"] for r in summary["rows"].values())


def test_per_device_batch_and_frozen_encoder_not_loaded(tmp_path):
  """A T5 config with no weights anywhere still plans: the encoder is a shape stand-in."""
  config = tiny(num_devices=3, compile=False)
  config.model.text_encoder.kind = "t5"
  config.model.text_encoder.path = "/nonexistent"
  summary = plan.run(config, tmp_path)
  rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
  train = next(r for r in rows if r["step"] == "pretrain_train")
  assert train["batch_per_device"] == 3  # ceil(8 / 3)
  assert train["flops"] > 0 and train["fits"] is None  # lowered only: no memory figures
  assert summary["rows"]["base/pretrain_train"]["params"] == count_params(
      plan.abstract_model(config)[1])


def test_register_row(tmp_path, monkeypatch):
  monkeypatch.setattr(plan, "ROW_BUILDERS", [])

  def matmul_rows(config, ctx):
    del config
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    return [plan.Program("toy", "matmul", jnp.matmul, (x, x), params=0,
                         batch_per_device=ctx.per_device(64))]

  plan.register_row(matmul_rows)
  summary = plan.run(tiny(), tmp_path)
  row = summary["rows"]["toy/matmul"]
  assert row["flops"] == pytest.approx(2 * 64**3, rel=0.01)


def test_bad_target():
  with pytest.raises(ValueError, match="plan.target"):
    plan.make_context(tiny(target="gpu:h100"))


def test_tpu_target_without_a_tpu(tmp_path):
  """Deviceless AOT compile for a TPU v4 chip (runs only where libtpu is installed)."""
  pytest.importorskip("libtpu")
  config = tiny(target="tpu:v4:2x2x1")
  summary = plan.run(config, tmp_path)
  doc = json.loads((tmp_path / "plan.json").read_text())
  assert doc["device_kind"] == "TPU v4"
  assert doc["device_memory_bytes"] == 32 * plan.GIB
  assert plan.make_context(load_config("tiny")).num_devices == 1
  target_only = load_config("tiny")
  target_only.plan = {"target": "tpu:v4:2x2x1"}
  assert plan.make_context(target_only).num_devices == 4  # its 4 chips
  assert all(r["fits"] and r["estimated_seconds"] > 0 for r in doc["rows"])
  assert summary["rows"]["base/pretrain_train"]["flops"] > 0
