"""Stage `plan`: what each step costs on one device, before any hardware is rented.

    python -m suti.launch --config=configs/paper.py --stages=plan

Every step is lowered and compiled ahead of time from abstract shapes (jax.ShapeDtypeStruct:
params and optimizer state come from jax.eval_shape, so nothing is allocated and the 2.1B-param
model plans on a laptop). XLA's cost and memory analyses of the compiled program give FLOPs per
step and bytes per device; workdir/plan.json gets one row per (model, step), e.g.

  {"model": "base", "step": "pretrain_train", "params": ..., "flops": ...,
   "bytes_per_device": {"argument": ..., "output": ..., "temp": ..., "alias": ...,
                        "generated_code": ..., "total": ...},
   "batch_per_device": ..., "device_memory_bytes": ..., "fits": ...}

with total = argument + output + temp - alias (donated buffers are counted once). By default
the figures come from XLA's compile for this machine, i.e. a *CPU* compile of the same program:
a TPU or GPU compile lays out and fuses differently (XLA:CPU even runs bfloat16 convolutions
in float32), so read them as an estimate, not a guarantee; `plan.target` below fixes that.

Rows. A row builder is `builder(config, ctx: Context) -> list[Program]`: it says what to
compile (function, abstract arguments, donated arguments) and this module measures it.
`ROW_BUILDERS` names the builders as "module:function" strings, imported only when the plan
runs (so a stage module may import this one without a cycle); a later stage appends its own,
e.g. "experts.parallel:plan_rows" for the expert fine-tune and sampling steps, or calls
`register_row(fn)`. `train_program` and `sample_program` build the usual two kinds of step.

Text. The plan never loads a frozen text encoder (T5-XXL is not needed to size the UNet): a
stand-in with the encoder's width and length feeds pre-encoded text [B, L, width] to the loss.
The world encoder, trained jointly with the UNet, is part of the train step as in `pretrain`.

Target. By default the programs compile for this machine's backend (the CPU, on a laptop).
`plan.target = "tpu:v4:2x2x1"` compiles them for one device of that TPU topology instead,
with no TPU present (deviceless AOT; needs the `libtpu` package, e.g. `pip install jax[tpu]`):
then the figures are the TPU compiler's own, and rows gain `estimated_seconds`, its cost
model's time for the step. v4 / v5p chips are planned as one "megacore" device per chip.

Keys (read with defaults, so configs without a `plan` section work):
  plan.num_devices        devices the global batch is split over; 0: all of the target's
  plan.device_memory_gib  memory of one device; 0: the target's (this machine's RAM on CPU)
  plan.target             "" (this machine) or "tpu:<topology>", e.g. "tpu:v4:2x2x1"
  plan.compile            False: lower only (FLOPs from the unoptimised HLO, no memory figures)
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from suti import diffusion
from suti import files
from suti import pretrain
from suti import train_lib
from suti.model import TextToImage
from suti.nn import text as text_lib
from suti.nn.unet import count_params

log = logging.getLogger("suti.plan")

GIB = 2**30
CAVEAT = ("memory and FLOPs are XLA's analyses of a CPU compile of the same program; a TPU/GPU "
          "compile lays out and fuses differently, so treat them as estimates")
TPU_CAVEAT = ("memory and FLOPs are the TPU compiler's analyses of a deviceless compile for one "
              "device of {target}; collectives of a multi-device step are not included")
# HBM per JAX device (one per chip; v4 / v5p as megacore), for plan.target = "tpu:...".
TPU_MEMORY_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
                  "TPU v6 lite": 32}

ROW_BUILDERS: list[str | Callable] = ["suti.plan:base_rows", "experts.parallel:plan_rows",
                                      "apprentice.stage:plan_rows"]


def register_row(builder: str | Callable) -> None:
  """Adds a row builder (a function, or "module:function") to every later plan."""
  if builder not in ROW_BUILDERS:
    ROW_BUILDERS.append(builder)


@dataclasses.dataclass(frozen=True)
class Context:
  """What every row builder needs besides the config."""
  num_devices: int
  device_memory_bytes: int
  device: Any = None  # a compile-only device of plan.target; None: this machine's default
  target: str = ""

  def per_device(self, global_batch: int) -> int:
    return math.ceil(global_batch / self.num_devices)


@dataclasses.dataclass
class Program:
  """One step to compile: fn(*args), args abstract (ShapeDtypeStruct pytrees)."""
  model: str
  step: str
  fn: Callable
  args: tuple
  params: int            # parameters the step reads (trainable ones for a train step)
  batch_per_device: int
  donate_argnums: tuple = ()
  info: dict = dataclasses.field(default_factory=dict)  # extra columns for plan.json


# ------------------------------------------------------------------------- abstract inputs

class PreEncodedText(text_lib.TextEncoder):
  """Stands in for a frozen encoder: its output shape only, no weights, no tokenizer."""
  trainable = False

  def __init__(self, kind: str, width: int, max_length: int):
    self.kind, self.width, self.max_length = kind, width, max_length

  def init_params(self, rng=None):
    del rng
    return {}


def abstract_model(config) -> tuple[TextToImage, dict, dict]:
  """(model, trainable, frozen) with abstract params; a frozen encoder is never loaded."""
  te = config.model.text_encoder
  text = None if te.kind == "world" else PreEncodedText(te.kind, te.width, te.max_length)
  model = TextToImage(config, text_encoder=text)
  trainable, frozen = model.abstract_init()
  return model, trainable, frozen


def abstract_cond(config, batch: int) -> dict:
  """Encoded text {'tokens': [B, L, width] float32, 'mask': [B, L] bool}, abstract."""
  te = config.model.text_encoder
  return {"tokens": jax.ShapeDtypeStruct((batch, te.max_length, te.width), jnp.float32),
          "mask": jax.ShapeDtypeStruct((batch, te.max_length), jnp.bool_)}


def abstract_batch(config, model: TextToImage, batch: int) -> dict:
  """A training batch: token ids for a jointly trained encoder, encoded text otherwise."""
  size = config.image_size
  image = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)}
  if model.text.trainable:
    length = model.text.max_length
    return dict(image, ids=jax.ShapeDtypeStruct((batch, length), jnp.int32),
                mask=jax.ShapeDtypeStruct((batch, length), jnp.bool_))
  return dict(image, **abstract_cond(config, batch))


# ------------------------------------------------------------------------- programs

def train_program(model_name, step_name, config, model, trainable, frozen, tx, batch: int,
                  **info) -> Program:
  """The pretrain-style update (`pretrain.make_train_step`) at `batch` examples per device."""
  opt_state = jax.eval_shape(tx.init, trainable)
  args = (trainable, opt_state, frozen, abstract_batch(config, model, batch),
          jax.ShapeDtypeStruct((), jnp.int32))
  return Program(model_name, step_name, pretrain.make_train_step(model, tx, config.seed), args,
                 params=count_params(trainable), batch_per_device=batch,
                 donate_argnums=(0, 1),  # as the training loops donate params and opt state
                 info=info)


def sample_program(model_name, step_name, config, model, unet_params, batch: int, *,
                   sampler: str, guidance: float, **info) -> Program:
  """One denoising step of `diffusion.sample` for `batch` images: with guidance, the UNet runs
  on 2 * batch (conditional and unconditional halves in one call)."""
  schedule = diffusion.respace(model.schedule, 1)  # a one-step chain: one UNet call
  shape = (batch, config.image_size, config.image_size, 3)
  guided = guidance != 1.0
  weights = [guidance] if guided else []

  def sample_step(unet_params, conds, rng):
    return diffusion.sample(model.denoise_fn, unet_params, schedule, conds, rng, shape,
                            weights=weights, sampler=sampler, steps=None,
                            prediction=model.prediction,
                            percentile=config.diffusion.dynamic_threshold_percentile)

  conds = tuple(abstract_cond(config, batch) for _ in range(2 if guided else 1))
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return Program(model_name, step_name, sample_step, (unet_params, conds, rng),
                 params=count_params(unet_params), batch_per_device=batch,
                 info=dict(info, sampler=sampler, guidance=guidance,
                           unet_batch=batch * (2 if guided else 1)))


def base_rows(config, ctx: Context) -> list[Program]:
  """The base model: its pretrain step (data parallel: the global batch split over devices)
  and one guided step of the sampler that draws its sample grids."""
  pc = config.pretrain
  model, trainable, frozen = abstract_model(config)
  tx = pretrain.make_optimizer(pc)
  return [
      train_program("base", "pretrain_train", config, model, trainable, frozen, tx,
                    ctx.per_device(pc.batch_size), optimizer=pc.optimizer,
                    global_batch=pc.batch_size),
      sample_program("base", "pretrain_sample", config, model, trainable["unet"],
                     pc.num_samples, sampler=pc.sample_sampler, guidance=pc.sample_guidance),
  ]


# ------------------------------------------------------------------------- measuring

def cost_dict(analysis) -> dict:
  """`compiled.cost_analysis()` as one dict (older jax returns a list, one per program)."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return dict(analysis or {})


def memory_figures(compiled) -> dict:
  """Bytes per device from XLA's buffer assignment."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
         "generated_code": m.generated_code_size_in_bytes}
  out = {k: int(v) for k, v in out.items()}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def measure(program: Program, ctx: Context, compile_: bool = True) -> dict:
  """Lowers (and compiles) one program; its plan.json row."""
  args = program.args
  if ctx.device is not None:  # place every argument on the target device: jit compiles for it
    sharding = jax.sharding.SingleDeviceSharding(ctx.device)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        args)
  start = time.perf_counter()
  lowered = jax.jit(program.fn, donate_argnums=program.donate_argnums).lower(*args)
  lower_seconds = time.perf_counter() - start
  row = {"model": program.model, "step": program.step, "params": program.params,
         "batch_per_device": program.batch_per_device, "num_devices": ctx.num_devices,
         **program.info}
  if compile_:
    start = time.perf_counter()
    compiled = lowered.compile()
    row["compile_seconds"] = round(time.perf_counter() - start, 2)
    cost, memory = cost_dict(compiled.cost_analysis()), memory_figures(compiled)
    row["source"] = f"compiled ({ctx.target or jax.default_backend()})"
    if "optimal_seconds" in cost:  # the TPU compiler's cost model
      row["estimated_seconds"] = float(cost["optimal_seconds"])
  else:
    cost, memory = cost_dict(lowered.cost_analysis()), {}
    row["source"] = "lowered (unoptimised HLO; no memory figures)"
  row["lower_seconds"] = round(lower_seconds, 2)
  row["flops"] = float(cost.get("flops", float("nan")))
  row["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
  row["bytes_per_device"] = memory
  row["device_memory_bytes"] = ctx.device_memory_bytes
  row["fits"] = bool(memory["total"] <= ctx.device_memory_bytes) if memory else None
  return row


def _resolve(builder) -> Callable:
  if callable(builder):
    return builder
  module, _, name = builder.partition(":")
  return getattr(importlib.import_module(module), name)


def local_device_memory() -> int:
  """This machine's memory per device: the accelerator's limit, or RAM for the CPU."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  import psutil  # pylint: disable=import-outside-toplevel
  return int(psutil.virtual_memory().total)


def target_devices(target: str) -> list:
  """"tpu:v4:2x2x1" -> the compile-only devices of that topology (no TPU needed, but libtpu)."""
  platform, _, topology = target.partition(":")
  if platform != "tpu" or not topology:
    raise ValueError(f"plan.target must be empty or 'tpu:<topology>' (e.g. 'tpu:v4:2x2x1'), "
                     f"got {target!r}")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"chip_config_name": "megacore"} if topology.startswith(("v4", "v5p")) else {}
  try:
    return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"plan.target={target!r}: cannot describe that TPU topology ({e}); "
                       f"deviceless TPU compiles need the libtpu package matching jax "
                       f"(pip install 'jax[tpu]=={jax.__version__}')") from e


def make_context(config) -> Context:
  settings = config.get("plan", None) or {}
  target = str(settings.get("target", "") or "")
  devices = target_devices(target) if target else jax.devices()
  device = devices[0] if target else None
  num_devices = int(settings.get("num_devices", 0)) or len(devices)
  gib = float(settings.get("device_memory_gib", 0))
  if gib <= 0 and device is not None:
    gib = TPU_MEMORY_GIB.get(device.device_kind, 0)
    if not gib:
      raise ValueError(f"plan.device_memory_gib: no known memory for {device.device_kind}; "
                       f"set it")
  memory = int(gib * GIB) if gib > 0 else local_device_memory()
  return Context(num_devices=num_devices, device_memory_bytes=memory, device=device,
                 target=target)


# ------------------------------------------------------------------------- output

def _si(value, unit=""):
  if value is None or not np.isfinite(value):
    return "-"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.2f} {prefix}{unit}"
  return f"{value:.0f} {unit}".rstrip()


def _bytes(value):
  if value is None:
    return "-"
  for scale, unit in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if value >= scale:
      return f"{value / scale:.2f} {unit}"
  return f"{value} B"


def format_table(rows: Sequence[dict]) -> str:
  """A plain-text table of the rows: bytes per device, and whether they fit its memory."""
  head = ("model", "step", "params", "batch/dev", "FLOPs/step", "argument", "output",
          "temp", "alias", "total", "device", "fits")
  lines = []
  for r in rows:
    b = r["bytes_per_device"] or {}
    fits = {True: "yes", False: "NO", None: "?"}[r["fits"]]
    lines.append((r["model"], r["step"], _si(r["params"]), str(r["batch_per_device"]),
                  _si(r["flops"]), _bytes(b.get("argument")), _bytes(b.get("output")),
                  _bytes(b.get("temp")), _bytes(b.get("alias")), _bytes(b.get("total")),
                  _bytes(r["device_memory_bytes"]), fits))
  widths = [max(len(x) for x in col) for col in zip(head, *lines)]
  fmt = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def run(config, workdir) -> dict:
  """Compiles every registered row's programs; writes workdir/plan.json; returns a summary."""
  settings = config.get("plan", None) or {}
  compile_ = bool(settings.get("compile", True))
  ctx = make_context(config)
  out = pathlib.Path(workdir) / "plan.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  caveat = TPU_CAVEAT.format(target=ctx.target) if ctx.target else CAVEAT
  doc = {"caveat": caveat, "target": ctx.target or jax.default_backend(),
         "device_kind": (ctx.device or jax.local_devices()[0]).device_kind,
         "jax": jax.__version__, "dtype": config.model.dtype, "num_devices": ctx.num_devices,
         "device_memory_bytes": ctx.device_memory_bytes, "rows": []}
  for builder in ROW_BUILDERS:
    for program in _resolve(builder)(config, ctx):
      log.info("plan: %s/%s (%s params, batch %d per device)", program.model, program.step,
               _si(program.params), program.batch_per_device)
      doc["rows"].append(measure(program, ctx, compile_))
      # Written after every row: a big model's compile takes minutes, keep what is done.
      files.write_json(out, doc)
  rows = doc["rows"]
  print(format_table(rows))
  print(f"({caveat}; total = argument + output + temp - alias)")
  return {"plan": str(out),
          "rows": {f"{r['model']}/{r['step']}": {
              "params": r["params"], "flops": r["flops"],
              "bytes_per_device": (r["bytes_per_device"] or {}).get("total"),
              "fits": r["fits"]} for r in rows}}
