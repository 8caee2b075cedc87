"""The end of a launch: a table of the stages in the terminal and workdir/report.md.

report.md gathers what a person wants to see after a run: each stage's headline numbers, the
evaluation table (the paper's Table 1 for this run) and SuTI's demo curve, and the sample
grids each stage wrote, linked relative to the workdir.
"""
from __future__ import annotations

import os
import pathlib

# Per stage: the summary keys worth a column in the terminal (when present).
HEADLINES = {
    "data": ("subjects", "images"),
    # Stage clip trains two scorers; its summary nests them: {'clip': {...}, 'dino': {...}}.
    "clip": ("clip.retrieval_top1", "clip.identity_auc", "clip.identity_auc_masked",
             "dino.auc"),
    "pretrain": ("steps", "final_loss", "images_per_second", "base_checkpoint"),
    "plan": ("rows",),
    "experts": ("rounds", "samples", "admitted", "acceptance_rate"),
    "apprentice": ("steps", "final_loss", "buffer_records_seen"),
    "evaluate": ("methods",),
    "export": ("step", "params", "checkpoint"),
}


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  return str(value)


def stage_rows(summary: dict) -> list[tuple[str, str, str]]:
  """(stage, seconds, headline numbers) per stage of a workdir summary."""
  rows = []
  for stage, result in summary.items():
    if not isinstance(result, dict):
      continue
    values = {k: v for k in HEADLINES.get(stage, ()) if (v := _lookup(result, k)) is not None}
    rows.append((stage, _fmt(result.get("seconds", "")),
                 "  ".join(f"{k}={_fmt(v)}" for k, v in values.items())))
  return rows


def _lookup(result: dict, dotted: str):
  """result['a']['b'] for 'a.b'; None where any part is missing."""
  for part in dotted.split("."):
    if not isinstance(result, dict) or part not in result:
      return None
    result = result[part]
  return result


def terminal_table(summary: dict) -> str:
  rows = [("stage", "seconds", "results")] + stage_rows(summary)
  widths = [max(len(r[i]) for r in rows) for i in range(2)]
  lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}" for r in rows]
  lines.insert(1, "-" * max(len(line) for line in lines))
  return "\n".join(lines)


def grids(workdir: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
  """(title, path) of the newest grid of each stage that wrote one."""
  found = []
  for title, pattern in (("Base model samples (pretrain)", "pretrain/samples/step_*.png"),
                         ("Expert pseudo-targets, last round (experts)",
                          "experts/grids/round_*.png"),
                         ("Apprentice on held-out subjects: demos | sample | oracle",
                          "apprentice/samples/step_*.png"),
                         ("Evaluation: demos | " + "methods", "evaluate/grid.png")):
    paths = sorted(workdir.glob(pattern))
    if paths:
      found.append((title, paths[-1]))
  return found


def write_report(workdir, summary: dict) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  lines = ["# SuTI run report", "", f"Workdir: `{workdir}`", "", "## Stages", "",
           "| stage | seconds | results |", "|---|---:|---|"]
  lines += [f"| {s} | {sec} | {res} |" for s, sec, res in stage_rows(summary)]
  evaluation = summary.get("evaluate")
  if isinstance(evaluation, dict) and evaluation.get("table"):
    from suti import evaluate  # pylint: disable=import-outside-toplevel
    lines += ["", "## Evaluation (held-out subjects)", "",
              f"{len(evaluation['subjects'])} subjects, {evaluation['prompts_per_subject']} "
              f"prompts each, {evaluation['images_per_prompt']} image(s) per prompt, "
              f"{evaluation['sampler']} {evaluation['sample_steps']} steps.", "",
              evaluate.format_table(evaluation["table"])]
    if evaluation.get("suti_minus_experts"):
      lines += ["", evaluate.format_paired(evaluation["suti_minus_experts"])]
    if evaluation.get("demo_gain"):
      gain = evaluation["demo_gain"]
      lines += ["", "What the subject's own demos add over another subject's (suti minus "
                "suti_other_demos): " + ", ".join(f"{evaluate.metric_label(k)} {v:+.3f}"
                                                 for k, v in gain.items())
                + ". (Near zero would mean the apprentice ignores its demos.)"]
    if evaluation.get("demo_curve"):
      lines += ["", "SuTI over the number of demos:", "", "| demos | DINO | CLIP-I | CLIP-T |",
                "|---:|---:|---:|---:|"]
      for n, row in evaluation["demo_curve"].items():
        lines.append(f"| {n} | {row.get('dino', float('nan')):.3f} | "
                     f"{row.get('clip_i', float('nan')):.3f} | "
                     f"{row.get('clip_t', float('nan')):.3f} |")
      if evaluation.get("columns"):
        lines += ["", "Grid columns: " + " | ".join(evaluation["columns"]) + "."]
  found = grids(workdir)
  if found:
    lines += ["", "## Sample grids"]
    for title, path in found:
      lines += ["", f"### {title}", "", f"![{title}]({os.path.relpath(path, workdir)})"]
  path = workdir / "report.md"
  path.write_text("\n".join(lines) + "\n")
  return path
