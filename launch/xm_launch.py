r"""Launch restem_jax.main with XManager (Vertex AI or a local Docker container).

xmanager is NOT in the core install: it downgrades protobuf to 6.x, which breaks
`import seqio`. Install it in a separate launch-only venv:

  python3.11 -m venv ~/xm-venv && ~/xm-venv/bin/pip install -e '.[launch]'
  ~/xm-venv/bin/python -m launch.xm_launch --executor=vertex --accelerator=a100=8 \
      --config=configs/llama3_1b_math_v4_32.py:bucket=gs://my-bucket \
      --workdir=gs://my-bucket/restem/llama3_1b_math_gpu --override=mesh.shape='(-1,1,1)'

`--dry_run` prints the job spec (JSON) without importing xmanager, so it works
from the core venv too. The command inside the container is built by
launch/commands.py, the same as on TPU VMs. One job = one host: multi-host TPU
pods go through launch/tpu_vm.py.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any, Sequence

from absl import app, flags

from launch import commands

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING_XM = ("xm_launch: xmanager is not installed; in a SEPARATE venv run "
              "`pip install 'restem-jax[launch]'` (it downgrades protobuf, which breaks seqio "
              "in the core venv), or use --dry_run")

_CONFIG = flags.DEFINE_string("config", "", "Config path[:arg], relative to the repo root.")
_WORKDIR = flags.DEFINE_string("workdir", "", "gs:// directory (the container's disk is ephemeral).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "key.path=value -> --config.key.path=value.")
_ENV = flags.DEFINE_multi_string("env", [], "KEY=VALUE set in the container.")
_EXECUTOR = flags.DEFINE_enum("executor", "vertex", ["vertex", "local"], "Where the job runs.")
_ACCEL = flags.DEFINE_string("accelerator", "", "xm.JobRequirements resource=count, e.g. a100=8, "
                             "tpu_v3=8; empty: CPU.")
_IMAGE = flags.DEFINE_string("base_image", "python:3.11", "Container base image (Python >= 3.11).")
_EXTRA = flags.DEFINE_string("pip_extra", "", "setup.py extra: gpu | tpu | '' (default: from "
                             "--accelerator).")
_TITLE = flags.DEFINE_string("title", "restem-jax", "Experiment title.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job spec; do not import xmanager.")


def job_spec(spec: commands.LaunchSpec, *, executor: str, accelerator: str = "",
             base_image: str = "python:3.11", pip_extra: str = "",
             title: str = "restem-jax", path: str = REPO_ROOT) -> dict[str, Any]:
  """A plain-dict description of the XManager job (what --dry_run prints)."""
  commands.validate(spec, need_tpu=False, need_source=False)
  requirements: dict[str, int] = {}
  if accelerator:
    name, count = commands.parse_kv([accelerator], "--accelerator").popitem()
    requirements[name.lower()] = int(count)
  if not pip_extra and requirements:
    pip_extra = "tpu" if any(k.startswith("tpu") for k in requirements) else "gpu"
  target = f".[{pip_extra}]" if pip_extra else "."
  name = os.path.basename(os.path.normpath(path))
  return {
      "title": title,
      "executable": {
          "type": "python_container",
          "path": path,
          "base_image": base_image,
          "docker_instructions": [
              f"COPY {name}/ /restem-jax",
              "WORKDIR /restem-jax",
              f"RUN python3 -m pip install -q -e {shlex.quote(target)}",
          ],
          "entrypoint": [shlex.join(commands.run_argv(spec, python="python3"))],
      },
      "executor": {"type": executor, "requirements": requirements},
      "env_vars": dict(spec.extra_env),
  }


def _launch(job: dict[str, Any]) -> None:
  try:
    # Lazy: only a real launch needs xmanager (separate venv, see above).
    from xmanager import xm, xm_local  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit(MISSING_XM)

  @xm.run_in_asyncio_loop
  async def launch() -> None:
    ex = job["executable"]
    req = xm.JobRequirements(**job["executor"]["requirements"])
    executor = xm_local.Vertex(requirements=req) if job["executor"]["type"] == "vertex" else \
        xm_local.Local(requirements=req)
    async with xm_local.create_experiment(experiment_title=job["title"]) as experiment:
      [executable] = experiment.package([xm.python_container(
          executor.Spec(), path=ex["path"], base_image=ex["base_image"],
          docker_instructions=ex["docker_instructions"],
          entrypoint=xm.CommandList(ex["entrypoint"]))])
      experiment.add(xm.Job(executable, executor, env_vars=job["env_vars"]))

  launch()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    spec = commands.LaunchSpec(config=_CONFIG.value, workdir=_WORKDIR.value,
                               overrides=tuple(_OVERRIDES.value),
                               extra_env=commands.parse_kv(_ENV.value, "--env"))
    job = job_spec(spec, executor=_EXECUTOR.value, accelerator=_ACCEL.value,
                   base_image=_IMAGE.value, pip_extra=_EXTRA.value, title=_TITLE.value)
  except (commands.LaunchError, ValueError) as e:
    sys.exit(f"xm_launch: {e}")
  if _DRY_RUN.value:
    print(json.dumps(job, indent=2, sort_keys=True))
    return
  _launch(job)


if __name__ == "__main__":
  app.run(main)
