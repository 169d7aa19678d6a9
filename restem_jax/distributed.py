"""Multi-host (multi-process) setup: jax.distributed, who writes, who does what.

Every host of a pod runs the *same* command. `initialize()` joins the hosts into
one JAX runtime so `jax.devices()` lists every chip of the slice and one
`jax.jit` spans them all. After that:

  * `is_coordinator()`: only process 0 writes eval.json, progress.json, logs
    and summaries (every host computes the same global metrics).
  * `process_shard(n)`: this host's contiguous share of n problems in the
    E-step; every host writes its own sample shards.
  * `sync(name)`: a barrier, e.g. before process 0 marks a phase complete.

ORDER MATTERS: `initialize()` must run before anything touches devices
(jax.devices(), jax.device_put, any computation, mesh creation): the XLA backend
is created on first use and cannot be joined to a cluster afterwards. main.py
calls it first thing after parsing flags.

CPU note (jax 0.10.2): multi-process CPU works out of the box: the default
`jax_cpu_collectives_implementation` is already "gloo", so cross-process
collectives run over TCP without any extra flag (tests/test_distributed.py runs
two real processes on localhost).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from restem_jax import configlib, errors

# Environment variables whose presence means "a scheduler / TPU runtime will
# tell jax.distributed.initialize() the process count and id", so the config
# does not need to. (GKE/TPU VM images set the TPU ones; SLURM and Open MPI are
# auto-detected by jax itself.)
_CLUSTER_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                     "MEGASCALE_NUM_SLICES", "CLOUD_TPU_TASK_ID", "SLURM_JOB_ID",
                     "OMPI_COMM_WORLD_SIZE")


def _env_says_multiprocess(env: Mapping[str, str]) -> str | None:
  """Why the environment looks like one process of several, or None."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS is set"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if "," in hosts:
    return "TPU_WORKER_HOSTNAMES lists several workers"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
    return "MEGASCALE (multi-slice) variables are set"
  if env.get("CLOUD_TPU_TASK_ID"):
    return "CLOUD_TPU_TASK_ID is set"
  return None


def _has_cluster_env(env: Mapping[str, str]) -> bool:
  return any(env.get(k) for k in _CLUSTER_ENV_VARS)


def initialize_kwargs(dist_cfg: ml_collections.ConfigDict,
                      env: Mapping[str, str] | None = None) -> dict | None:
  """The jax.distributed.initialize() kwargs this config asks for, or None (no-op).

  Pure (reads `env`, touches no device), so the decision is unit-testable.
  Raises ConfigError with one line on an unusable combination.
  """
  env = os.environ if env is None else env
  mode = dist_cfg.initialize
  configlib.check_choice("distributed.initialize", mode)
  if mode == "never":
    return None
  coordinator = dist_cfg.coordinator_address or ""
  num_processes = int(dist_cfg.num_processes)
  process_id = int(dist_cfg.process_id)
  if mode == "auto" and not coordinator and not _env_says_multiprocess(env):
    return None  # A single process: laptop, one GPU box, single-host TPU VM.

  kwargs: dict = {}
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  if num_processes > 0:
    kwargs["num_processes"] = num_processes
  if process_id >= 0:
    kwargs["process_id"] = process_id
  # An explicit coordinator without a cluster environment: nobody can tell this
  # process how many peers it has or who it is; jax would hang or fail deep
  # inside. Say so in one line instead.
  explicit = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
  if explicit and not _has_cluster_env(env) and (num_processes <= 0 or process_id < 0):
    raise errors.ConfigError(
        f"distributed: coordinator_address={explicit!r} is set but "
        f"num_processes={num_processes} / process_id={process_id} are not, and no TPU/SLURM/MPI "
        "environment can supply them; set --config.distributed.num_processes=N and "
        "--config.distributed.process_id=I on every host (or use a TPU VM)")
  if (num_processes > 0) != (process_id >= 0) and not _has_cluster_env(env):
    raise errors.ConfigError(
        f"distributed: set both num_processes and process_id, or neither "
        f"(got num_processes={num_processes}, process_id={process_id})")
  if 0 < num_processes <= process_id:
    raise errors.ConfigError(
        f"distributed.process_id={process_id} must be in [0, num_processes={num_processes})")
  return kwargs


def initialize(dist_cfg: ml_collections.ConfigDict) -> None:
  """Joins this process to the multi-host JAX runtime if the config/env asks for it.

  Modes (config.distributed.initialize):
    "never":  no-op (single process).
    "always": jax.distributed.initialize(**set fields); on TPU VMs jax discovers
              the coordinator, process count and id itself.
    "auto":   initialize only for a multi-process run: a coordinator address in
              the config or JAX_COORDINATOR_ADDRESS, or a TPU slice with several
              workers (TPU_WORKER_HOSTNAMES with a comma, MEGASCALE_* or
              CLOUD_TPU_TASK_ID). On a TPU VM pod whose env carries none of these
              (plain `gcloud ... ssh`), use "always": launch/ passes it.

  Idempotent: a second call is a no-op. Must be called before any JAX call
  that touches devices (see module docstring).
  """
  kwargs = initialize_kwargs(dist_cfg)
  if kwargs is None or jax.distributed.is_initialized():
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
        "restem_jax.distributed.initialize() must run before any JAX call that touches devices "
        "(jax.devices(), a mesh, any computation); call it first thing in main()")
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_coordinator() -> bool:
  """True on process 0: the only one that writes eval.json, logs, summaries."""
  return jax.process_index() == 0


def process_shard(n_items: int, process_index: int | None = None,
                  process_count: int | None = None) -> range:
  """This process's contiguous share of items 0..n_items-1.

  Deterministic and balanced (sizes differ by at most one; the first
  n_items % process_count processes get the extra item); across processes
  the ranges cover every item exactly once. Index and count default to this
  process's; they are parameters so the arithmetic is testable without peers.
  Use `items[r.start:r.stop]` to slice a list.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if n_items < 0 or process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_shard(n_items={n_items}, process_index={process_index}, "
                     f"process_count={process_count}): out of range")
  base, extra = divmod(n_items, process_count)
  start = process_index * base + min(process_index, extra)
  return range(start, start + base + (process_index < extra))


def sync(name: str) -> None:
  """Barrier across all processes (a no-op with one process).

  Every process must call it with the same name in the same order.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(name)


def broadcast_from_coordinator(x: np.ndarray) -> np.ndarray:
  """Process 0's value of `x` on every process (identity with one process).

  For decisions that must agree across hosts, e.g. which E-step chunks are
  left to do: every host then runs the same collective programs.
  """
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def score_shared(score_fn: Callable[[Sequence[Any]], Sequence[float]],
                 items: Sequence[Any]) -> list[float]:
  """score_fn(items) with each process scoring only its share; every process gets all scores.

  For evaluation, where every host needs every reward (all compute the same
  metrics) but running e.g. programs on every host would repeat the slowest
  part of the work process_count times.
  """
  if jax.process_count() == 1:
    return [float(x) for x in score_fn(items)]
  share = process_shard(len(items))
  width = -(-len(items) // jax.process_count())  # equal shapes for the gather
  local = np.full((width,), np.nan, np.float32)
  local[:len(share)] = np.asarray(score_fn(items[share.start:share.stop]), np.float32)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [process_count, width]
  return [float(gathered[p, j]) for p in range(jax.process_count())
          for j in range(len(process_shard(len(items), p)))]
