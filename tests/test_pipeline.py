"""The whole pipeline on the tiny config, run the way a user first runs it: the Colab notebook's
code cells (launch/colab_tpu.ipynb) executed on CPU. Then: complete stages are skipped, the
report has its tables and grids, the trained models are evaluated on a DreamBench-layout
folder, and the export generates on its own."""
import json
import os
import pathlib

import numpy as np
import pytest

from suti import config_lib, launch
from tests.conftest import REPO
from tests.test_data_sources import make_dreambench
from tests.test_scoring import real_dirs  # pylint: disable=unused-import  (a fixture)

NOTEBOOK = REPO / "launch" / "colab_tpu.ipynb"
ALL_STAGES = ["data", "clip", "pretrain", "experts", "apprentice", "evaluate", "export"]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipeline") / "w"
  env = {"SUTI_NOTEBOOK_CONFIG": str(REPO / "configs" / "tiny.py"),
         "SUTI_NOTEBOOK_WORKDIR": str(workdir), "SUTI_NOTEBOOK_INSTALL": "0"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  namespace = {"__name__": "__notebook__"}
  try:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    for cell in cells:
      if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)  # pylint: disable=exec-used
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return workdir, namespace


def test_every_stage_ran_and_wrote_its_outputs(notebook_run):
  workdir, ns = notebook_run
  summary = json.loads((workdir / "summary.json").read_text())
  assert list(summary) == ALL_STAGES
  assert summary["experts"]["samples"] > 0
  assert summary["apprentice"]["steps"] == 20
  table = summary["evaluate"]["table"]
  assert list(table) == ["base", "experts", "suti", "suti_other_demos", "dream_suti", "oracle"]
  for row in table.values():
    for metric in ("dino", "clip_i", "clip_t", "mdino", "mclip_i"):
      assert -1.0 <= row[metric] <= 1.0
  assert table["suti"]["seconds_per_subject"] > 0 and table["oracle"]["num_images"] == 4
  assert set(summary["evaluate"]["demo_curve"]) == {"1", "2", "3"}
  paired = summary["evaluate"]["suti_minus_experts"]
  for metric in ("dino", "clip_i", "clip_t"):
    assert paired[metric] == pytest.approx(table["suti"][metric] - table["experts"][metric])
    assert paired[metric + "_se"] >= 0
  assert ns["images"].shape == (4, 16, 16, 3)  # the notebook's last cell, from the export


def test_report_has_the_table_and_grids(notebook_run):
  workdir, _ = notebook_run
  report = (workdir / "report.md").read_text()
  assert "| method | DINO | CLIP-I | CLIP-T | MDINO | MCLIP-I | s/subject |" in report
  assert "| dream_suti |" in report and "SuTI over the number of demos" in report
  assert "suti minus experts, paired over subjects" in report
  # Stage clip's summary nests its two scorers; their headlines reach the stage table.
  clip_row = next(line for line in report.splitlines() if line.startswith("| clip |"))
  assert "clip.identity_auc=" in clip_row and "dino.auc=" in clip_row, clip_row
  images = [line.split("](")[1].rstrip(")") for line in report.splitlines()
            if line.startswith("![")]
  assert "evaluate/grid.png" in images and len(images) == 4
  assert all((workdir / path).exists() for path in images)


def test_a_second_launch_skips_every_complete_stage(notebook_run):
  workdir, _ = notebook_run
  before = json.loads((workdir / "summary.json").read_text())
  stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()
            and p.name not in ("summary.json", "config.json")}
  config = config_lib.validate(config_lib.load_config_file(REPO / "configs" / "tiny.py"))
  after = launch.run_stages(config, workdir, ALL_STAGES)
  for stage in ALL_STAGES:
    assert {k: v for k, v in after[stage].items() if k != "seconds"} == \
        {k: v for k, v in before[stage].items() if k != "seconds"}, stage
  changed = [str(p.relative_to(workdir)) for p, t in stamps.items()
             if p.exists() and p.stat().st_mtime_ns != t]
  assert not changed, changed


def test_the_other_demos_control_gives_each_subject_the_next_subjects_demos(monkeypatch):
  from apprentice import generate as gen  # pylint: disable=import-outside-toplevel
  from suti import evaluate  # pylint: disable=import-outside-toplevel
  from suti.data.types import SubjectCluster  # pylint: disable=import-outside-toplevel

  def cluster(i):
    images = [np.full((16, 16, 3), 10 * i + j, np.uint8) for j in range(5)]
    return SubjectCluster(subject_id=f"s{i}", class_name="ball", images=images,
                          captions=[f"c{i}"] * 5, prompts=[f"p{i}"], masks=[], spec="")

  seen = []

  def fake_generate(model, params, frozen, demos, prompt, *, captions, num_images, seed,
                    pad_demos_to):
    assert pad_demos_to == config.apprentice.num_inference_demos  # one sampler for any count
    seen.append((int(demos[0][0, 0, 0]), len(demos), captions[0], prompt, seed))
    return np.zeros((num_images, 16, 16, 3), np.uint8)

  monkeypatch.setattr(gen, "generate", fake_generate)
  models = type("Models", (), {"apprentice": (None, None, None)})()
  config = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  clusters = [cluster(i) for i in range(3)]
  prompts = [c.prompts for c in clusters]
  evaluate.run_suti(config, models, clusters, prompts, demos_of_subject=1)
  n = config.apprentice.num_inference_demos
  # Subject i keeps its prompt and seed but reads subject i+1's demos and captions.
  assert seen == [(10, n, "c1", "p0", config.seed), (20, n, "c2", "p1", config.seed + 1),
                  (0, n, "c0", "p2", config.seed + 2)]
  assert "suti_other_demos" in evaluate.methods_to_run(config, 3)
  assert "suti_other_demos" not in evaluate.methods_to_run(config, 1)
  table = {"suti": {"dino": 0.5, "clip_i": 0.25}, "suti_other_demos": {"dino": 0.25,
                                                                      "clip_i": 0.25}}
  assert evaluate.demo_gain(table) == {"dino": 0.25, "clip_i": 0.0}


def test_evaluate_draws_a_saved_method_again_when_what_made_it_changed(tmp_path, caplog):
  """A resumed evaluate reads back a method's saved images only while everything they depend
  on is the same, so a table never mixes images drawn with different settings or models."""
  import copy  # pylint: disable=import-outside-toplevel
  from suti import evaluate  # pylint: disable=import-outside-toplevel
  from suti.data.types import SubjectCluster  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  clusters = [SubjectCluster(subject_id=f"s{i}", class_name="ball", images=[], captions=[],
                             prompts=[f"p{i}"], masks=[], spec="") for i in range(2)]
  prompts = [c.prompts for c in clusters]

  def key(cfg, name):
    return evaluate.method_key(cfg, tmp_path, name, clusters, prompts)

  draws = []

  def draw():
    draws.append(len(draws) + 1)
    return [np.full((1, 4, 4, 3), draws[-1], np.uint8)], [0.5]

  path = tmp_path / "evaluate" / "methods" / "suti.npz"
  first, seconds = evaluate.load_or_draw(path, draw, key(config, "suti"))
  again, again_seconds = evaluate.load_or_draw(path, draw, key(config, "suti"))
  assert draws == [1] and again[0][0, 0, 0, 0] == 1 and again_seconds == seconds == [0.5]

  # Another guidance for SuTI changes SuTI's key only; the experts' fine-tuning steps change
  # the experts' only; the experts stage's buffer settings change neither.
  other = copy.deepcopy(config)
  other.apprentice.guidance = config.apprentice.guidance + 1.0
  assert key(other, "suti") != key(config, "suti")
  assert key(other, "experts") == key(config, "experts")
  other = copy.deepcopy(config)
  other.experts.num_steps += 1
  assert key(other, "experts") != key(config, "experts")
  assert key(other, "oracle") == key(config, "oracle")
  other.experts.num_rounds += 1
  other.experts.num_steps -= 1
  assert key(other, "experts") == key(config, "experts")

  # The apprentice trained (again): its newest checkpoint is new, so SuTI is drawn again.
  from suti import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  with checkpoint_lib.Checkpoints(tmp_path / "apprentice" / "checkpoints") as ckpt:
    ckpt.save(10, params={"w": np.zeros(2, np.float32)})
  redrawn, _ = evaluate.load_or_draw(path, draw, key(config, "suti"))
  assert draws == [1, 2] and redrawn[0][0, 0, 0, 0] == 2
  assert "suti.npz was drawn with other apprentice_checkpoint; drawing it again" in caplog.text
  # A method saved before keys were (no key in the file) is drawn again too.
  np.savez(path, count=1, seconds=np.asarray([0.1]), images_0=np.zeros((1, 4, 4, 3), np.uint8))
  evaluate.load_or_draw(path, draw, key(config, "suti"))
  assert draws == [1, 2, 3]
  assert "suti.npz was saved without a key (by an older version); drawing it again" in caplog.text


def test_evaluate_runs_on_a_dreambench_folder_with_given_scoring_models(notebook_run, tmp_path,
                                                                         real_dirs):
  """configs/dreambench.py's path: real photos in DreamBench's layout, pretrained CLIP / DINO
  given by path (tiny ones in the Hugging Face format here), the trained models of a run."""
  import shutil  # pylint: disable=import-outside-toplevel
  from suti import evaluate, scoring  # pylint: disable=import-outside-toplevel
  from suti.data import stage as data_stage  # pylint: disable=import-outside-toplevel

  trained, _ = notebook_run
  workdir = tmp_path / "db"
  for name in ("pretrain", "apprentice"):
    shutil.copytree(trained / name, workdir / name)
  config = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  config.data.source, config.data.path = "dreambench", str(make_dreambench(tmp_path / "src"))
  config.clip.path, config.dino.path = (str(d) for d in real_dirs)
  config.apprentice.num_inference_demos = 3
  config.evaluate.images_per_prompt = 2
  config_lib.validate(config)
  data_stage.run(config, workdir)
  assert scoring.run(config, workdir)["clip"] == {"path": str(real_dirs[0]), "trained": False}
  summary = evaluate.run(config, workdir)
  # backpack (3 usable photos) and dog (5); teapot has 2 and is skipped by the data stage.
  assert summary["subjects"] == ["backpack", "dog"]
  assert summary["methods"] == ["base", "experts", "suti", "suti_other_demos", "dream_suti"]
  for name in summary["methods"]:
    images = np.load(workdir / "evaluate" / "methods" / f"{name}.npz")
    # Every prompt of the subject's DreamBench list (object: 3, live: 2), 2 images each.
    assert [images[f"images_{i}"].shape[0] for i in range(2)] == [6, 4], name
    row = summary["table"][name]
    assert all(-1.0 <= row[m] <= 1.0 for m in ("dino", "clip_i", "clip_t"))
    assert "mdino" not in row and "mclip_i" not in row  # photos come without subject masks
  assert set(summary["demo_curve"]) == {"1", "2", "3"} and "demo_gain" in summary


def test_export_is_self_contained(notebook_run, tmp_path):
  # Last in this file: it deletes the apprentice's checkpoints from the shared workdir.
  import shutil  # pylint: disable=import-outside-toplevel
  from apprentice import export, generate  # pylint: disable=import-outside-toplevel
  workdir, ns = notebook_run
  moved = pathlib.Path(shutil.copytree(export.stage_dir(workdir), tmp_path / "export"))
  shutil.rmtree(workdir / "apprentice" / "checkpoints")  # nothing of the workdir is needed
  model, params, frozen = generate.load(moved / "checkpoint")
  again = generate.generate(model, params, frozen, list(ns["cluster"].images[:4]),
                            ns["cluster"].prompts[-1], num_images=4, seed=0)
  np.testing.assert_array_equal(again, ns["images"])
