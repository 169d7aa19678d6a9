"""Test session setup: CPU only, 8 fake devices (set before jax is imported).

Single-device references use a mesh over `jax.devices()[:1]`, so one process
covers both the 8-device and the 1-device runs that the sharding tests compare.
"""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, this process and every run it starts
# (they inherit the environment): the many end-to-end runs of the same tiny configs then
# compile each program once (a tiny run: ~45 -> ~25 s). Compiled programs only; removed at
# exit, so no session sees another's.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="restem_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  # A size limit turns on the cache's file lock: pytest-xdist's workers (and the runs they
  # start) share this directory and must not read an entry while another writes it.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# TensorFlow (pulled in by seqio) must not grab every core or print banners.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import json  # noqa: E402
import subprocess  # noqa: E402

import filelock  # noqa: E402

import pytest  # noqa: E402

# Plain helpers live in tests/helpers.py; the fixtures below use them.
# Re-exported for tests that import them from conftest.
from helpers import (ROOT, TINY_CONFIG, load_config, main_cmd, mesh_of, subprocess_env,  # noqa: E402,F401
                     task_cfg, tiny_cfg)


# Test files that load real weights beside transformers' torch model (the Gemma logits test
# alone peaks near 18 GB).
REAL_WEIGHTS = ("tests/test_export.py", "tests/test_gemma3_gguf.py", "tests/test_import.py")


@pytest.fixture(scope="module", autouse=True)
def one_real_weights_file_at_a_time(request, tmp_path_factory):
  """Under pytest-xdist (`make test`, --dist loadfile: a file runs whole on one worker) a
  REAL_WEIGHTS file holds a lock shared by the workers from its first test to its last, so
  no two of them run at once on the 24 GB CI machine."""
  if (request.node.nodeid.split("::")[0] not in REAL_WEIGHTS
      or not os.environ.get("PYTEST_XDIST_WORKER")):
    yield
    return
  with filelock.FileLock(str(tmp_path_factory.getbasetemp().parent / "real_weights.lock")):
    yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One uninterrupted run of configs/tiny.py, shared by the tests that read a workdir
  (which copy it before changing it). Under pytest-xdist (`make test`) the first worker
  that needs it makes it, under a file lock in the directory the workers share; the
  others wait and read it: one run per session, not one per worker."""
  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is .../popen-gwN; its parent is shared.
    shared = shared.parent
  workdir, record = str(shared / "tiny_run"), str(shared / "tiny_run.process.json")
  with filelock.FileLock(str(shared / "tiny_run.lock")):
    if not os.path.exists(record):
      p = subprocess.run(main_cmd(workdir), cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=900)
      assert p.returncode == 0, p.stderr[-3000:]
      with open(record, "w") as f:
        json.dump({"args": p.args, "returncode": p.returncode, "stdout": p.stdout,
                   "stderr": p.stderr}, f)
    with open(record) as f:
      p = subprocess.CompletedProcess(**json.load(f))
  return workdir, p
