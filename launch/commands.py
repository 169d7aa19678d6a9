"""The one place launch commands are built (tpu_vm.py and xm_launch.py both use it).

Pure string/argv construction: nothing here runs a process, touches the network
or imports jax, so tests check the exact commands.

Remote commands are shell strings (ssh runs them through the remote shell), so
every token is shlex-quoted here; local commands are argv lists (no shell).
"""
from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Mapping, Sequence

# Default TPU VM software versions per generation (gcloud --version=...).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "restem-jax"  # Relative to the remote $HOME.
REMOTE_TARBALL = "restem-jax.tar.gz"
REMOTE_LOG = "restem-jax.log"


class LaunchError(ValueError):
  """A launch request that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Topology:
  chips: int  # JAX devices (one per chip; v4/v5p megacore counts a chip once).
  hosts: int  # TPU VM workers: one process each.


def tpu_topology(accelerator_type: str) -> Topology:
  """Chips and hosts of a Cloud TPU accelerator type such as "v4-32" or "v5p-128".

  v2/v3/v4/v5p names count TensorCores (2 per chip); v5litepod/v6e names count
  chips. Multi-host slices have 4 chips per host (v2/v3: 4 chips = 8 cores);
  v5litepod-8 / v6e-8 are single hosts with 8 chips.
  """
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator_type)
  if not m:
    raise LaunchError(
        f"unknown accelerator type {accelerator_type!r}; expected e.g. v4-32, v5p-128, "
        "v5litepod-16, v6e-8")
  gen, n = m.group(1), int(m.group(2))
  if gen in ("v2", "v3", "v4", "v5p"):
    chips = max(1, n // 2)
    return Topology(chips, max(1, chips // 4))
  return Topology(n, 1 if n <= 8 else n // 4)


def runtime_version(accelerator_type: str) -> str:
  gen = accelerator_type.split("-")[0]
  return RUNTIME_VERSIONS["v5litepod" if gen == "v5e" else gen]


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
  """Everything a launch needs. Required fields first."""
  config: str  # e.g. "configs/llama3_1b_math_v4_32.py:bucket=gs://b"
  workdir: str  # gs://... on pods (every host must see it); a local path on one machine.
  tpu_name: str = ""
  zone: str = ""
  project: str = ""
  accelerator_type: str = ""  # e.g. "v4-32"; sets the worker count.
  num_workers: int = 0  # 0: derived from accelerator_type (1 without one).
  overrides: Sequence[str] = ()  # "train.learning_rate=1e-5" -> --config.train.learning_rate=1e-5
  repo_url: str = ""  # git clone source ...
  branch: str = "main"
  tarball: str = ""  # ... or a local tarball (git archive) copied to every worker.
  extra_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
  pip_extra: str = "tpu"  # setup.py extra: tpu | gpu | "" (CPU).
  python: str = "3.11"  # Interpreter version for the remote venv (the pins need >= 3.11).
  detach: bool = False  # nohup the run and log to ~/restem-jax.log (survives ssh drops).

  @property
  def workers(self) -> int:
    if self.num_workers > 0:
      return self.num_workers
    return tpu_topology(self.accelerator_type).hosts if self.accelerator_type else 1


def validate(spec: LaunchSpec, *, need_tpu: bool, need_source: bool = True) -> None:
  """One-line errors for missing or contradictory fields."""
  missing = [f for f in ("config", "workdir") if not getattr(spec, f)]
  if need_tpu:
    missing += [f for f in ("tpu_name", "zone", "project") if not getattr(spec, f)]
  if missing:
    raise LaunchError(f"missing required launch argument(s): {', '.join('--' + m for m in missing)}")
  if need_source and bool(spec.repo_url) == bool(spec.tarball):
    raise LaunchError("give exactly one code source: --repo_url (git) or --tarball (local file)")
  if spec.workers > 1 and not spec.workdir.startswith("gs://"):
    raise LaunchError(
        f"workdir {spec.workdir!r} is local but the job has {spec.workers} hosts; use a gs:// "
        "workdir that every host can read and write")
  for k in spec.extra_env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
      raise LaunchError(f"bad environment variable name {k!r}")


def config_flags(spec: LaunchSpec) -> list[str]:
  """The restem_jax.main flags (unquoted argv tokens), shared by every launcher."""
  flags = [f"--config={spec.config}", f"--workdir={spec.workdir}"]
  overrides = []
  for o in spec.overrides:
    o = o.removeprefix("--").removeprefix("config.")
    if "=" not in o:
      raise LaunchError(f"config override {o!r} must look like key.path=value")
    overrides.append(f"--config.{o}")
  # A pod's hosts get no cluster variables over plain ssh: tell main to call
  # jax.distributed.initialize() (TPU VMs discover the peers themselves).
  if spec.workers > 1 and not any(o.startswith("--config.distributed.initialize=")
                                  for o in overrides):
    overrides.append("--config.distributed.initialize=always")
  return flags + overrides


def run_argv(spec: LaunchSpec, python: str = ".venv/bin/python") -> list[str]:
  return [python, "-m", "restem_jax.main"] + config_flags(spec)


def _env_prefix(env: Mapping[str, str]) -> str:
  return "".join(f"export {k}={shlex.quote(v)}; " for k, v in sorted(env.items()))


def setup_command(spec: LaunchSpec) -> str:
  """Remote shell command run on every worker: fetch the code, build the venv.

  Idempotent (rerunning updates the checkout and reinstalls), so the same
  launch command also serves resume. uv provides a Python 3.11 venv on any
  image (TPU VM images ship 3.10; numpy 2.4 needs 3.11).
  """
  d = REMOTE_DIR
  if spec.repo_url:
    url, br = shlex.quote(spec.repo_url), shlex.quote(spec.branch)
    fetch = (f"if [ -d {d}/.git ]; then git -C {d} fetch -q --depth 1 origin {br} && "
             f"git -C {d} checkout -q -B {br} FETCH_HEAD; "
             f"else git clone -q --depth 1 --branch {br} {url} {d}; fi")
  else:
    fetch = f"rm -rf {d} && mkdir -p {d} && tar -xzf {REMOTE_TARBALL} -C {d}"
  target = f".[{spec.pip_extra}]" if spec.pip_extra else "."
  return " && ".join([
      "set -e", "cd ~", fetch, f"cd {d}",
      "(command -v uv >/dev/null || python3 -m pip install -q --user uv)",
      'export PATH="$HOME/.local/bin:$PATH"',
      f"(test -x .venv/bin/python || uv venv -q --python {shlex.quote(spec.python)} .venv)",
      f"uv pip install -q --python .venv/bin/python -e {shlex.quote(target)}",
  ])


def run_command(spec: LaunchSpec) -> str:
  """Remote shell command run on every worker: the same on all hosts."""
  main = shlex.join(run_argv(spec))
  cmd = f"cd ~/{REMOTE_DIR} && {_env_prefix(spec.extra_env)}{main}"
  if spec.detach:
    cmd = f"nohup bash -c {shlex.quote(cmd)} < /dev/null > ~/{REMOTE_LOG} 2>&1 &"
  return cmd


# --- gcloud argv (local side: lists, never shell=True). ---

def _gcloud_tpu(spec: LaunchSpec, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args,
          f"--zone={spec.zone}", f"--project={spec.project}"]


def create_argv(spec: LaunchSpec, version: str = "", spot: bool = False) -> list[str]:
  if not spec.accelerator_type:
    raise LaunchError("--accelerator_type is required to create a TPU VM (e.g. v4-32)")
  argv = _gcloud_tpu(spec, "create", spec.tpu_name)
  argv += [f"--accelerator-type={spec.accelerator_type}",
           f"--version={version or runtime_version(spec.accelerator_type)}"]
  return argv + (["--spot"] if spot else [])


def ssh_argv(spec: LaunchSpec, remote_command: str) -> list[str]:
  return _gcloud_tpu(spec, "ssh", spec.tpu_name) + ["--worker=all",
                                                     f"--command={remote_command}"]


def scp_argv(spec: LaunchSpec) -> list[str]:
  return _gcloud_tpu(spec, "scp", spec.tarball, f"{spec.tpu_name}:{REMOTE_TARBALL}") + [
      "--worker=all"]


def tpu_vm_plan(spec: LaunchSpec, create: bool = False, version: str = "",
                spot: bool = False) -> list[list[str]]:
  """The local argv lists, in order, that launch `spec` on a TPU VM."""
  validate(spec, need_tpu=True)
  plan = [create_argv(spec, version, spot)] if create else []
  if spec.tarball:
    plan.append(scp_argv(spec))
  plan.append(ssh_argv(spec, setup_command(spec)))
  plan.append(ssh_argv(spec, run_command(spec)))
  return plan


def parse_kv(items: Sequence[str], what: str) -> dict[str, str]:
  """["K=V", ...] from a repeated flag -> {K: V}; `what` names the flag in errors."""
  out = {}
  for item in items:
    if "=" not in item:
      raise LaunchError(f"{what} {item!r} must look like KEY=VALUE")
    k, v = item.split("=", 1)
    out[k] = v
  return out
