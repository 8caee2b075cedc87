"""launch/tpu_pod.sh: the same suti.launch on every worker, distributed on, arguments checked."""
import subprocess

from tests.conftest import REPO

SCRIPT = REPO / "launch" / "tpu_pod.sh"


def _run(*args):
  return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                        timeout=60)


def test_dry_run_starts_one_command_on_all_workers():
  result = _run("--tpu=pod-1", "--zone=us-central2-b", "--workdir=/mnt/suti/w", "--dry_run",
                "--", "--config=configs/paper.py", "--stages=pretrain,experts")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert "scp" in lines[-2] and "--worker=all" in lines[-2]  # the checkout to every worker
  ssh = lines[-1].replace("\\", "")
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b --worker=all")
  assert ("python3 -m suti.launch --workdir=/mnt/suti/w --config=configs/paper.py "
          "--stages=pretrain,experts --config.distributed.initialize=True") in ssh


def test_clone_instead_of_copy_and_missing_arguments():
  result = _run("--tpu=pod-1", "--zone=z", "--workdir=/w", "--repo=https://example.com/suti.git",
                "--dry_run", "--", "--config=configs/demo.py")
  assert result.returncode == 0 and "scp" not in result.stdout
  assert "git clone -q https://example.com/suti.git" in result.stdout.replace("\\", "")
  result = _run("--tpu=pod-1", "--workdir=/w", "--", "--config=configs/demo.py")
  assert result.returncode == 2 and "--zone" in result.stderr
  result = _run("--tpu=pod-1", "--zone=z", "--workdir=/w")
  assert result.returncode == 2 and "suti.launch flags" in result.stderr
