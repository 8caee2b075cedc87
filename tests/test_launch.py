"""The entry point: config files and overrides, stage checks, the data stage, re-runs."""
import json
import subprocess
import sys

import pytest

from suti import config_lib, launch
from tests.conftest import REPO


def _launch(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "suti.launch", *args], capture_output=True,
                        text=True, cwd=cwd)


def test_data_stage_runs_and_is_skipped_when_complete(tmp_path):
  workdir = tmp_path / "w"
  first = _launch("--config=configs/tiny.py", f"--workdir={workdir}", "--stages=data")
  assert first.returncode == 0, first.stderr
  summary = json.loads(first.stdout.strip().splitlines()[-1])
  tiny = config_lib.validate(__import__("tests.conftest").conftest.load_config("tiny"))
  assert summary["data"]["splits"] == {"train": tiny.data.world.num_train_subjects,
                                       "eval": tiny.data.world.num_eval_subjects}
  assert json.loads((workdir / "summary.json").read_text())["data"]["subjects"] == \
      summary["data"]["subjects"]
  assert json.loads((workdir / "config.json").read_text())["image_size"] == tiny.image_size

  again = _launch("--config=configs/tiny.py", f"--workdir={workdir}", "--stages=data")
  assert again.returncode == 0 and "is complete; reusing it" in again.stderr


def test_overrides_reach_the_config_and_change_the_dataset(tmp_path):
  workdir = tmp_path / "w"
  ok = _launch("--config=configs/tiny.py", f"--workdir={workdir}",
               "--config.data.world.num_train_subjects=3")
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout.strip().splitlines()[-1])["data"]["splits"]["train"] == 3
  # The same workdir with another data config would overwrite committed work: refused.
  clash = _launch("--config=configs/tiny.py", f"--workdir={workdir}")
  assert clash.returncode == 2 and "another data config" in clash.stderr


@pytest.mark.parametrize("args,message", [
    (["--config.experts.num_steps=-3"], "experts.num_steps must be an integer > 0, got -3"),
    (["--stages=data,nonsense"], "unknown stage 'nonsense'"),
    (["--config.data.source=dreambench"], "data.path must name a folder"),
    (["--config.data.source=folder", "--config.data.path=/does/not/exist"], "does not exist"),
])
def test_bad_input_exits_with_a_clear_error(tmp_path, args, message):
  result = _launch("--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", *args)
  assert result.returncode == 2
  assert message in result.stderr


def test_default_workdir_names_config_and_variant():
  assert str(launch.default_workdir("configs/demo.py:64")) == "workdir/demo-64"
  assert str(launch.default_workdir("configs/tiny.py")) == "workdir/tiny"
