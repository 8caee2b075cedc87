"""The one entry point: runs the SuTI pipeline's stages for a config.

    python -m suti.launch --config=configs/demo.py [--workdir=DIR] [--stages=data,pretrain]
    python -m suti.launch --config=configs/demo.py:64 --config.data.world.seed=3

Each stage is `run(config, workdir)`: it reads its inputs from and writes its outputs to the
workdir, and skips or resumes what is already complete, so re-running the command is safe.
"""
from __future__ import annotations

import importlib
import json
import logging
import pathlib
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from suti import config_lib
from suti import files
from suti import hostmem

# Stage name -> module with `run(config, workdir) -> dict`. Stages of config_lib.PIPELINE_ORDER
# that are missing here are not built yet; asking for one is an error before any work starts.
STAGES = {
    "data": "suti.data.stage",
    "clip": "suti.scoring",
    "pretrain": "suti.pretrain",
    "plan": "suti.plan",
    "experts": "experts.stage",
    "apprentice": "apprentice.stage",
    "evaluate": "suti.evaluate",
    "export": "apprentice.export",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Where every stage reads and writes; default workdir/<config name>.")
_STAGES = flags.DEFINE_string(
    "stages", "", "Comma-separated stages to run, overriding config.stages.")

log = logging.getLogger("suti")


def default_workdir(config_path: str) -> pathlib.Path:
  """configs/demo.py:64 -> workdir/demo-64."""
  path, _, variant = config_path.partition(":")
  name = pathlib.Path(path).stem + (f"-{variant}" if variant else "")
  return pathlib.Path("workdir") / name


def resolve_stages(config, stages_flag: str = "") -> list[str]:
  """The stages to run, checked: known names, and built in this version."""
  names = config_lib.parse_stages(stages_flag or config.stages)
  missing = [n for n in names if n not in STAGES]
  if missing:
    raise config_lib.ConfigError(
        f"stages: {', '.join(map(repr, missing))} not available in this version of suti "
        f"(available: {', '.join(STAGES)})")
  return names


def run_stages(config, workdir, stages: list[str]) -> dict:
  """Runs the stages in order; returns {stage: its summary} and writes workdir/summary.json."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=1, sort_keys=True))
  summary_path = workdir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  for name in stages:
    log.info("stage %s: starting", name)
    start = time.time()
    result = importlib.import_module(STAGES[name]).run(config, workdir)
    summary[name] = dict(result or {}, seconds=round(time.time() - start, 2))
    files.write_json(summary_path, summary)
    log.info("stage %s: done in %.1fs: %s", name, summary[name]["seconds"],
             json.dumps(summary[name]))
  return summary


def _quiet_libraries():
  """Orbax and TFDS log every save and read at INFO through absl; keep warnings only."""
  # Only the 'absl' logger: suti's own loggers keep INFO (absl's handler on root prints them).
  logging.getLogger("absl").setLevel(logging.WARNING)


def _enable_compilation_cache(directory: str):
  import os
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not directory:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  try:
    config_lib.validate(config)
    stages = resolve_stages(config, _STAGES.value)
  except config_lib.ConfigError as e:
    print(f"error: invalid config {flags.FLAGS['config'].config_filename}: {e}",
          file=sys.stderr)
    sys.exit(2)
  workdir = pathlib.Path(_WORKDIR.value or
                         default_workdir(flags.FLAGS["config"].config_filename))
  from suti import mesh  # jax is imported only once the config is known to be valid
  _quiet_libraries()
  _enable_compilation_cache(config.compilation_cache_dir)
  mesh.initialize_distributed(config.distributed)
  try:
    summary = run_stages(config, workdir, stages)
  except (config_lib.InputError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from suti import report  # pylint: disable=import-outside-toplevel
  report_path = report.write_report(workdir, summary)
  print(report.terminal_table(summary), file=sys.stderr)
  print(f"report: {report_path}", file=sys.stderr)
  print(json.dumps({"workdir": str(workdir), "report": str(report_path), **summary}))


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # before jax starts: XLA:CPU's buffers on huge pages
  app.run(main)
