r"""Launch restem_jax.main on every worker of a Cloud TPU VM (slice or pod).

  python -m launch.tpu_vm --tpu_name=restem-v4 --zone=us-central2-b --project=my-proj \
      --accelerator_type=v4-32 --repo_url=https://github.com/ORG/restem-jax --branch=main \
      --config=configs/llama3_1b_math_v4_32.py:bucket=gs://my-bucket \
      --workdir=gs://my-bucket/restem/llama3_1b_math \
      --override=train.learning_rate=1e-5 --dry_run

Steps: [create the VM] -> [scp the tarball] -> setup on all workers -> run on all
workers. `--dry_run` prints the exact commands instead of running them. Rerunning
the same command resumes the run (setup is idempotent; main resumes from the
workdir's progress.json).
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence

from absl import app, flags

from launch import commands

_TPU = flags.DEFINE_string("tpu_name", "", "TPU VM name.")
_ZONE = flags.DEFINE_string("zone", "", "GCP zone, e.g. us-central2-b.")
_PROJECT = flags.DEFINE_string("project", "", "GCP project id.")
_ACCEL = flags.DEFINE_string("accelerator_type", "", "e.g. v4-32, v5p-128 (sets the worker count).")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "Override the worker count (0: from the type).")
_CONFIG = flags.DEFINE_string("config", "", "Config path[:arg], relative to the repo root.")
_WORKDIR = flags.DEFINE_string("workdir", "", "gs:// directory shared by all hosts.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "key.path=value -> --config.key.path=value.")
_REPO = flags.DEFINE_string("repo_url", "", "git URL the workers clone.")
_BRANCH = flags.DEFINE_string("branch", "main", "git branch or tag.")
_TARBALL = flags.DEFINE_string("tarball", "", "Local .tar.gz of the repo (git archive), scp'd.")
_ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE exported before the run.")
_EXTRA = flags.DEFINE_string("pip_extra", "tpu", "setup.py extra installed on the workers.")
_DETACH = flags.DEFINE_bool("detach", False, "nohup the run; output in ~/restem-jax.log.")
_CREATE = flags.DEFINE_bool("create", False, "Create the TPU VM first.")
_VERSION = flags.DEFINE_string("version", "", "TPU software version for --create (default by type).")
_SPOT = flags.DEFINE_bool("spot", False, "Create a spot (preemptible) VM.")
_SKIP_SETUP = flags.DEFINE_bool("skip_setup", False, "Only run (code already installed).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def spec_from_flags() -> commands.LaunchSpec:
  return commands.LaunchSpec(
      config=_CONFIG.value, workdir=_WORKDIR.value, tpu_name=_TPU.value, zone=_ZONE.value,
      project=_PROJECT.value, accelerator_type=_ACCEL.value, num_workers=_WORKERS.value,
      overrides=tuple(_OVERRIDES.value), repo_url=_REPO.value, branch=_BRANCH.value,
      tarball=_TARBALL.value, extra_env=commands.parse_kv(_ENV.value, "--env"), pip_extra=_EXTRA.value,
      detach=_DETACH.value)


def plan_from_flags() -> list[list[str]]:
  spec = spec_from_flags()
  plan = commands.tpu_vm_plan(spec, create=_CREATE.value, version=_VERSION.value,
                              spot=_SPOT.value)
  if _SKIP_SETUP.value:
    setup = commands.ssh_argv(spec, commands.setup_command(spec))
    plan = [argv for argv in plan if argv != setup and argv[4] != "scp"]
  return plan


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    plan = plan_from_flags()
  except commands.LaunchError as e:
    sys.exit(f"tpu_vm: {e}")
  for cmd in plan:
    if _DRY_RUN.value:
      print(shlex.join(cmd))
      continue
    print("+", shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
      sys.exit(f"tpu_vm: command failed with exit status {rc}: {shlex.join(cmd[:6])} ...")


if __name__ == "__main__":
  app.run(main)
