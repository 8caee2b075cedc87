"""suti.hostmem: entry points restart with glibc's malloc on transparent huge pages."""
import os
import subprocess
import sys

import pytest

from suti import hostmem


def test_with_huge_pages_adds_the_tunable_and_keeps_the_users():
  assert hostmem.with_huge_pages({"A": "1"}) == {
      "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert hostmem.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
  # Set already, to anything (0 is the user's opt-out): left alone, and no restart loop.
  for tunables in ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2"):
    assert hostmem.with_huge_pages({"GLIBC_TUNABLES": tunables}) is None


def test_huge_pages_unavailable_when_the_kernel_has_them_off(tmp_path):
  never = tmp_path / "enabled"
  never.write_text("always madvise [never]\n")
  assert not hostmem.huge_pages_available(str(never))
  assert not hostmem.huge_pages_available(str(tmp_path / "missing"))


needs_huge_pages = pytest.mark.skipif(not hostmem.huge_pages_available(),
                                      reason="needs glibc >= 2.35 and transparent huge pages")


def _env_without_tunables():
  return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


@needs_huge_pages
def test_reexec_restarts_once_with_the_same_arguments(tmp_path):
  script = tmp_path / "child.py"
  script.write_text(
      "import os, sys\n"
      "from suti import hostmem\n"
      "print('start', os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
      "hostmem.reexec_with_huge_pages()\n"
      "initial = open('/proc/self/environ', 'rb').read().split(b'\\0')\n"
      "print('run', b'GLIBC_TUNABLES=glibc.malloc.hugetlb=1' in initial, sys.argv[1:])\n")
  out = subprocess.run([sys.executable, str(script), "--flag=1", "x y"], check=True,
                       capture_output=True, text=True, env=_env_without_tunables()).stdout
  assert out.splitlines() == ["start None", "start glibc.malloc.hugetlb=1",
                              "run True ['--flag=1', 'x y']"]


@needs_huge_pages
def test_the_tunable_faults_a_large_block_in_huge_pages():
  # What XLA:CPU does with a program's temporary buffer at each step: malloc a block too large
  # for glibc's heap (a fresh mmap), write it, free it.
  code = (
      "import ctypes, resource\n"
      "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
      "libc.free.argtypes = [ctypes.c_void_p]\n"
      "size = 64 << 20\n"
      "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
      "for _ in range(4):\n"
      "  block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)\n"
      "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
  def faults(env):
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True, env=env).stdout)
  plain = faults(_env_without_tunables())
  huge = faults(hostmem.with_huge_pages(_env_without_tunables()))
  assert plain >= 4 * (64 << 20) // 4096 * 0.9  # every 4 KiB page, every time
  assert huge < plain / 8  # 2 MiB pages: ~30x fewer faults on Zen 3, Linux 6.18
