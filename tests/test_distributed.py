"""restem_jax.distributed: shard arithmetic, init decisions, and real 2-process runs."""
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from helpers import main_cmd, subprocess_env
from restem_jax import configlib, distributed
from restem_jax.partitioning import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dist_cfg(**fields):
  cfg = configlib.default_config().distributed
  cfg.unlock()
  for k, v in fields.items():
    setattr(cfg, k, v)
  return cfg


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 100, 101])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 16])
def test_process_shard_covers_every_item_once_and_balanced(n, count):
  shards = [distributed.process_shard(n, i, count) for i in range(count)]
  seen = [i for r in shards for i in r]
  assert seen == list(range(n))  # contiguous, in order, no gaps, no repeats
  sizes = [len(r) for r in shards]
  assert max(sizes) - min(sizes) <= 1
  # Deterministic: same answer twice.
  assert shards == [distributed.process_shard(n, i, count) for i in range(count)]


def test_process_shard_defaults_to_this_process():
  assert distributed.process_shard(10) == range(0, 10)  # one process in tests


def test_process_shard_rejects_bad_index():
  with pytest.raises(ValueError):
    distributed.process_shard(10, 2, 2)


def test_auto_without_env_is_noop():
  assert distributed.initialize_kwargs(_dist_cfg(), env={}) is None
  # A single-host TPU VM lists one worker: still a single process.
  assert distributed.initialize_kwargs(_dist_cfg(), env={"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  distributed.initialize(_dist_cfg(initialize="never"))
  # The test process's env has none of the trigger variables.
  distributed.initialize(_dist_cfg())


def test_auto_detects_tpu_pod_and_explicit_coordinator():
  assert distributed.initialize_kwargs(_dist_cfg(), env={"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
  assert distributed.initialize_kwargs(_dist_cfg(), env={"MEGASCALE_NUM_SLICES": "2"}) == {}
  kw = distributed.initialize_kwargs(
      _dist_cfg(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1), env={})
  assert kw == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}


def test_always_passes_only_set_fields():
  assert distributed.initialize_kwargs(_dist_cfg(initialize="always"), env={}) == {}


def test_bad_combination_is_one_clear_line():
  with pytest.raises(ConfigError, match="num_processes") as e:
    distributed.initialize_kwargs(_dist_cfg(coordinator_address="10.0.0.1:1234"), env={})
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="num_processes"):
    distributed.initialize_kwargs(_dist_cfg(), env={"JAX_COORDINATOR_ADDRESS": "h:1"})
  with pytest.raises(ConfigError, match="process_id"):
    distributed.initialize_kwargs(
        _dist_cfg(coordinator_address="h:1", num_processes=2, process_id=2), env={})
  with pytest.raises(ConfigError, match="initialize"):
    distributed.initialize_kwargs(_dist_cfg(initialize="sometimes"), env={})
  # On a TPU pod jax discovers the missing fields itself: no error.
  assert distributed.initialize_kwargs(
      _dist_cfg(coordinator_address="h:1"), env={"TPU_WORKER_HOSTNAMES": "a,b"}) == {
          "coordinator_address": "h:1"}


def test_initialize_after_devices_are_used_fails_clearly():
  import jax
  jax.devices()  # the backend now exists; joining a cluster is no longer possible
  cfg = _dist_cfg(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)
  with pytest.raises(RuntimeError, match="before any JAX call"):
    distributed.initialize(cfg)


def test_sync_is_noop_with_one_process():
  distributed.sync("single")
  assert distributed.is_coordinator()


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from restem_jax import configlib, distributed
    pid, port = int(sys.argv[1]), sys.argv[2]
    cfg = configlib.default_config()
    cfg.distributed.coordinator_address = "127.0.0.1:" + port
    cfg.distributed.num_processes = 2
    cfg.distributed.process_id = pid
    distributed.initialize(cfg.distributed)
    distributed.initialize(cfg.distributed)  # idempotent
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from restem_jax import partitioning
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
    mesh = partitioning.make_mesh(cfg.mesh)  # (-1, 1, 1): all 4 global devices on "data"
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    rows = distributed.process_shard(8)  # this host's 4 of 8 rows
    local = np.arange(rows.start, rows.stop, dtype=np.float32)
    x = jax.make_array_from_process_local_data(sharding, local, (8,))
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    distributed.sync("after_sum")
    seen = []
    scores = distributed.score_shared(lambda xs: seen.extend(xs) or [10.0 * x for x in xs],
                                      list(range(7)))
    assert scores == [10.0 * x for x in range(7)], scores
    print(f"RESULT pid={jax.process_index()} coord={distributed.is_coordinator()} "
          f"rows={rows.start}:{rows.stop} total={float(total)} scored={seen}", flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_both(argvs: list, env: dict, budget_s: float) -> list:
  """Runs the peer processes together (they block on each other); their outputs.

  Output goes to files, not pipes: a peer blocked on a full pipe that nobody
  reads yet would stall the collective the other peer is waiting in.
  """
  logs = [tempfile.TemporaryFile("w+") for _ in argvs]
  procs = [subprocess.Popen(a, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
           for a, log in zip(argvs, logs)]
  deadline = time.monotonic() + budget_s  # one budget for all of them
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outs = []
  for p, log in zip(procs, logs):
    log.seek(0)
    outs.append(log.read())
    log.close()
    assert p.returncode == 0, outs[-1][-3000:]
  return outs


@pytest.mark.slow
def test_two_real_processes_on_localhost():
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID"):
    env.pop(k, None)
  port = str(_free_port())
  outs = _run_both([[sys.executable, "-c", _CHILD, str(i), port] for i in range(2)], env,
                   budget_s=60)
  results = sorted(line for out in outs for line in out.splitlines() if line.startswith("RESULT"))
  assert results == [
      "RESULT pid=0 coord=True rows=0:4 total=28.0 scored=[0, 1, 2, 3]",
      "RESULT pid=1 coord=False rows=4:8 total=28.0 scored=[4, 5, 6]",
  ], outs


def _read_tree(workdir: str, pattern: str) -> dict:
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, pattern))):
    with open(path) as f:
      out[os.path.relpath(path, workdir)] = json.load(f)
  return out


def _kept_samples(workdir: str) -> list:
  rows = []
  for path in glob.glob(os.path.join(workdir, "iter_*", "samples", "shard_*.jsonl")):
    with open(path) as f:
      rows += [line for line in f if line.strip()]
  return sorted(rows)


@pytest.mark.slow
def test_tiny_run_on_two_processes_equals_one_process(tmp_path):
  """configs/tiny.py end to end on 2 processes x 1 CPU device == 1 process x 2 devices.

  The mesh is (data 1, fsdp 2): params and optimizer state are split across
  the two hosts, so training, the collective Orbax saves/restores and the
  global sampling program all cross the process boundary. Same devices, same
  program: the eval results and kept samples must be identical, not close.
  """
  mesh = "--config.mesh.shape=(1,2,1)"
  one = str(tmp_path / "one")
  env = subprocess_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  p = subprocess.run(main_cmd(one, mesh), cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]

  two, port = str(tmp_path / "two"), str(_free_port())
  env = subprocess_env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID"):
    env.pop(k, None)
  _run_both([main_cmd(two, mesh, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                      "--config.distributed.num_processes=2",
                      f"--config.distributed.process_id={i}") for i in range(2)], env,
            budget_s=700)

  evals = _read_tree(one, "*/eval.json")
  assert set(evals) == {"base_eval/eval.json", "iter_001/eval.json", "iter_002/eval.json",
                        "sft/eval.json"}
  assert _read_tree(two, "*/eval.json") == evals
  # Each host scored and wrote its own half of every E-step chunk...
  for host in (0, 1):
    stats = glob.glob(os.path.join(two, "iter_001", "samples", f"stats_*_p{host:03d}.jsonl"))
    assert stats and all(os.path.getsize(s) > 0 for s in stats), host
  # ...and together they kept exactly the samples the single process kept.
  assert _kept_samples(two) == _kept_samples(one) != []
