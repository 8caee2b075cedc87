"""Host memory for XLA:CPU: glibc's malloc on transparent huge pages.

XLA:CPU allocates a program's temporary buffer at every execution and frees it after. The
demo's apprentice step needs ~350 MB of it; glibc serves a block that size with a fresh mmap,
so each step faults it in 4 KiB at a time: 87,000 page faults and 0.32 s in the kernel of a
0.61 s step on 2 cores. glibc (>= 2.35) madvises its mappings for transparent huge pages with
the tunable `glibc.malloc.hugetlb=1`: 435 faults, 0.44 s a step (docs/RESULTS.md, issue 7).
Tunables are read once, when a process starts, so the command-line entry points re-execute
themselves with it set, before jax is imported. A `glibc.malloc.hugetlb` the user set stays.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`environ` with the tunable added to GLIBC_TUNABLES; None if it names the tunable already."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if any(t.split("=")[0] == TUNABLE for t in tunables.split(":")):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def huge_pages_available(thp_setting: str = THP_SETTING) -> bool:
  """Whether this is glibc >= 2.35 on a kernel whose transparent huge pages are not off."""
  try:
    libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    with open(thp_setting, encoding="ascii") as f:
      thp = f.read()
  except (AttributeError, ValueError, OSError):  # not Linux, not glibc, or no THP
    return False
  major, minor = (int(v) for v in version.split(".")[:2])
  return libc == "glibc" and (major, minor) >= (2, 35) and "[never]" not in thp


def huge_pages_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`with_huge_pages(environ)` where it would change something here; None otherwise."""
  added = with_huge_pages(environ)
  return added if added is not None and huge_pages_available() else None


def reexec_with_huge_pages() -> None:
  """Restarts this Python command with huge-page malloc, unless set already or unavailable.

  Call first thing in a `__main__`: the process is replaced, with the same argv.
  """
  environ = huge_pages_environ(os.environ)
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
  except OSError:
    pass  # the run goes on without huge pages: slower, same results
