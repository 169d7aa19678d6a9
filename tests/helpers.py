"""Plain helpers shared by the test modules (tests/conftest.py keeps the fixtures).

One copy of each: configs and meshes of the test sizes, the command and environment of a
user's run, a GGUF file written with the gguf library, and a grader whose worker hangs,
crashes or blocks on cue. Imported by spawned grader workers too, so nothing heavy
(jax, torch) is imported at module level.
"""
from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")


def subprocess_env() -> dict:
  """Environment of a plain user run: one CPU device, quiet TensorFlow."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def main_cmd(workdir: str, *extra: str, config: str = TINY_CONFIG) -> list:
  """argv of `python -m restem_jax.main --config=config --workdir=workdir extra...`."""
  return [sys.executable, "-m", "restem_jax.main", f"--config={config}",
          f"--workdir={workdir}", *extra]


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


@functools.cache
def mesh1():
  """The one-device mesh (the first fake device) the sharded results are compared with."""
  import jax  # pylint: disable=import-outside-toplevel
  return mesh_of((1, 1, 1), jax.devices()[:1])


def write_gguf(path, arch: str, tensors: Mapping | Iterable = (),
               fields: Iterable[tuple] = ()) -> str:
  """A GGUF file written by the gguf library's GGUFWriter; returns its path.

  `fields`: (name, *args) in file order, each written by `GGUFWriter.add_<name>(*args)`
  (("block_count", 2), ("uint32", "zz.after", 7)); `tensors`: name -> array, or pairs.
  """
  import gguf  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  w = gguf.GGUFWriter(str(path), arch)
  for name, *args in fields:
    getattr(w, f"add_{name}")(*args)
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  for name, t in items:
    w.add_tensor(name, np.ascontiguousarray(t))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


# ----------------------------------------------------------- graders whose workers misbehave


def _misbehaving_check(real, cues, gold, answer, timeout_s):
  """`real`, unless its gold or answer (stripped) is one of the cues."""
  said = {str(gold).strip(), str(answer).strip()}
  if cues["hang"] in said:  # SIGPROF is blocked: stuck as in C code, only a kill ends this.
    time.sleep(3600)
  if cues["crash"] in said:
    os._exit(137)  # As the kernel's OOM killer would end it.
  if cues["block"] in said:  # Sleeping uses no CPU: only a kill from outside ends this.
    marker = os.environ["RESTEM_TEST_BLOCK_MARKER"]
    with open(marker + ".tmp", "w") as f:
      f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)
    time.sleep(600)
  return real(gold, answer, timeout_s)


def _misbehaving_worker_main(conn, module: str, check: str, cues: dict) -> None:
  """Runs in the spawned worker: `module.check` swapped for the misbehaving one, then the
  module's own worker loop."""
  signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGPROF])
  mod = importlib.import_module(module)
  setattr(mod, check, functools.partial(_misbehaving_check, getattr(mod, check), cues))
  mod._worker_main(conn)  # pylint: disable=protected-access


def misbehaving_grader(cls: type, check: str, hang_grace_s: float | None = None,
                       hang: str = "hang", crash: str = "crash", block: str = "block") -> type:
  """A subclass of the pool grader `cls` (rewards.math.MathGrader or a subclass) whose
  workers run the module's in-worker check (`check`, its name) unless a gold or an answer
  is a cue: `hang` sleeps with SIGPROF blocked (the in-worker timer cannot stop it; the
  parent kills the worker after 2 timeout_s + hang_grace_s); `crash` ends the worker's
  process; `block` writes the worker's pid to the file $RESTEM_TEST_BLOCK_MARKER names and
  sleeps until the test kills it from outside."""
  cues = {"hang": hang, "crash": crash, "block": block}
  attrs = {"_worker_target": staticmethod(functools.partial(
      _misbehaving_worker_main, module=cls.__module__, check=check, cues=cues))}
  if hang_grace_s is not None:
    attrs["hang_grace_s"] = hang_grace_s
  return type(f"Misbehaving{cls.__name__}", (cls,), attrs)
