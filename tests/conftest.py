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
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# TensorFlow (pulled in by seqio) must not grab every core or print banners.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import subprocess  # noqa: E402

import pytest  # noqa: E402

TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: > ~10 s on 2 cores; `make test-fast` skips them")


def subprocess_env() -> dict:
  """Environment of a plain user run: one CPU device, quiet TensorFlow."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def task_cfg(name="embedded_arith", data_dir="", **kw):
  """config.task of the default config with name, data_dir and any fields overridden."""
  from restem_jax import configlib  # pylint: disable=import-outside-toplevel
  cfg = configlib.default_config().task
  cfg.unlock()
  cfg.name, cfg.data_dir = name, data_dir
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def load_config(path):
  """A configs/*.py file as a module, loaded by path as config_flags loads it."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def tiny_cfg(**kw):
  """A small GQA ModelConfig (4 query heads, 2 KV heads) for unit tests; kw overrides fields."""
  from restem_jax import model  # pylint: disable=import-outside-toplevel
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
              rope_base=10000.0, tie_embeddings=False, max_seq_len=24)
  base.update(kw)
  return model.ModelConfig(**base)


def mesh_of(shape, devices=None):
  """The mesh of `mesh.shape = shape` over `devices` (default: all 8 fake CPU devices)."""
  from restem_jax import configlib, partitioning  # pylint: disable=import-outside-toplevel
  c = configlib.default_config()
  c.mesh.shape = shape
  return partitioning.make_mesh(c.mesh, devices)


def main_cmd(workdir: str, *extra: str, config: str = TINY_CONFIG) -> list:
  return [sys.executable, "-m", "restem_jax.main", f"--config={config}",
          f"--workdir={workdir}", *extra]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One uninterrupted run of configs/tiny.py, shared by the tests that read a workdir."""
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  p = subprocess.run(main_cmd(workdir), cwd=ROOT, env=subprocess_env(), capture_output=True,
                     text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, p


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: real weights, subprocess runs, > ~10 s (make "
                          "test-fast deselects them)")
