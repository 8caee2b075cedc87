"""Stage `data`: builds the subject-cluster dataset of `config.data` into `workdir/data`."""
from __future__ import annotations

import pathlib

from suti.data import builder


def run(config, workdir) -> dict:
  """Builds (or reuses, when complete) the dataset; returns the build summary."""
  summary = builder.build(config, pathlib.Path(workdir) / "data")
  return {k: v for k, v in summary.items() if k != "skipped"}
