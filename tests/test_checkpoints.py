"""Checkpoint tests: restore onto other meshes, exact resume of training, loud failures."""
import os
import shutil

import jax
import numpy as np
import pytest

from restem_jax import checkpoints as C, model as M
from helpers import mesh_of
from test_training import host, mesh1, random_batch, tiny_cfg, trainer


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def params8():
  """Params created on all 8 devices, split over fsdp and tensor."""
  return M.init_params(tiny_cfg(), mesh_of((2, 2, 2)), jax.random.key(7))


@pytest.fixture(scope="module")
def saved(params8, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt") / "base")
  C.save_params(path, params8, {"model": {"d_model": 32}, "note": "base"})
  return path


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_params_restore_on_any_mesh(params8, saved, shape):
  mesh = mesh1() if shape == (1, 1, 1) else mesh_of(shape)
  restored = C.restore_params(saved, tiny_cfg(), mesh)
  assert_trees_equal(restored, params8)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(M.param_shardings(tiny_cfg(), mesh))):
    assert x.sharding == s
  assert C.read_metadata(saved) == {"model": {"d_model": 32}, "note": "base"}


def test_stacked_layer_checkpoint_restores_per_layer(params8, tmp_path):
  """A checkpoint of the earlier layout (params["layers"] leaves stacked [n_layers, ...],
  built here by hand) restores into per-layer params, on another mesh's shardings."""
  p, cfg = host(params8), tiny_cfg()
  layers = [p[f"layers_{i}"] for i in range(cfg.n_layers)]
  legacy = {k: v for k, v in p.items() if not k.startswith("layers_")}
  legacy["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  path = str(tmp_path / "legacy")
  C.save_params(path, jax.tree.map(jax.numpy.asarray, legacy), {"note": "stacked"})
  mesh = mesh_of((1, 4, 2))
  restored = C.restore_params(path, cfg, mesh)
  assert_trees_equal(restored, params8)
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(M.param_shardings(cfg, mesh))):
    assert x.sharding == s


def test_save_params_overwrites_atomically(params8, tmp_path):
  path = str(tmp_path / "best")
  C.save_params(path, params8, {"v": 1})
  doubled = jax.tree.map(lambda x: x * 2, params8)
  C.save_params(path, doubled, {"v": 2})
  assert_trees_equal(C.restore_params(path, tiny_cfg(), mesh1()), doubled)
  assert C.read_metadata(path) == {"v": 2}
  assert os.listdir(tmp_path) == ["best"]  # no temporaries or old copies left behind


def _copy(saved, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(saved, dst)
  return dst


def test_missing_checkpoint_fails_naming_path(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(C.CheckpointError, match=f"no params checkpoint at {missing}"):
    C.restore_params(missing, tiny_cfg(), mesh1())


@pytest.mark.parametrize("damage", ["delete_manifest", "garbage_data", "delete_metadata",
                                    "empty_dir"])
def test_damaged_checkpoint_fails_naming_path(saved, tmp_path, damage):
  path = _copy(saved, tmp_path)
  params_dir = os.path.join(path, "params")
  if damage == "delete_manifest":
    os.remove(os.path.join(params_dir, "manifest.ocdbt"))
  elif damage == "garbage_data":
    for root, _, files in os.walk(os.path.join(params_dir, "d")):
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"\x00garbage" * 64)
    for root, _, files in os.walk(os.path.join(params_dir, "ocdbt.process_0")):
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"\x00garbage" * 64)
  elif damage == "delete_metadata":
    os.remove(os.path.join(params_dir, "_METADATA"))
  elif damage == "empty_dir":
    shutil.rmtree(path)
    os.makedirs(path)
  with pytest.raises(C.CheckpointError, match=path):
    C.restore_params(path, tiny_cfg(), mesh1())


def test_shape_mismatch_fails_naming_path(saved):
  with pytest.raises(C.CheckpointError,
                     match=f"{saved} does not match.*layers_0/down has shape \\(48, 32\\), "
                           "the config needs \\(40, 32\\)"):
    C.restore_params(saved, tiny_cfg(d_ff=40), mesh1())


@pytest.mark.slow
def test_train_state_resume_is_exact(params8, tmp_path):
  """Save mid-training, keep going (that step donates the state while the async
  save may still be writing), then 'kill': a fresh checkpointer restores, and the
  next step equals the uninterrupted one bit for bit. The same checkpoint restores
  on 1 device with equal values."""
  tr = trainer((2, 2, 2))
  b0, b1 = random_batch(10), random_batch(11)
  state, _ = tr.step(tr.init_state(params8), b0)
  at_save = host(state)
  ckpt = C.TrainCheckpointer(str(tmp_path / "train"), keep=2)
  ckpt.save(1, state, {"data_position": 1, "best_score": 0.25})
  uninterrupted, m_ref = tr.step(state, b1)  # donates `state`
  ckpt.close()
  del ckpt

  again = C.TrainCheckpointer(str(tmp_path / "train"))
  assert again.latest_step() == 1
  restored, extra = again.restore(tr.abstract_state())
  assert extra == {"data_position": 1, "best_score": 0.25}
  assert_trees_equal(restored, at_save)
  resumed, m = tr.step(restored, b1)
  assert m == m_ref
  assert_trees_equal(resumed, uninterrupted)

  tr1 = trainer((1, 1, 1))
  on_one, _ = again.restore(tr1.abstract_state(), step=1)
  assert_trees_equal(on_one, at_save)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(on_one))
  again.close()


def test_train_checkpointer_retention_and_tmp_dirs(tmp_path):
  d = str(tmp_path / "train")
  tree = {"w": np.arange(6.0, dtype=np.float32)}
  with C.TrainCheckpointer(d, keep=2) as ckpt:
    assert ckpt.latest_step() is None
    with pytest.raises(C.CheckpointError, match=f"no checkpoint in {d}"):
      ckpt.restore(tree)
    for step in (2, 4, 6):
      ckpt.save(step, {"w": tree["w"] + step}, {"step": step})
  # A half-written checkpoint (what a kill during a save leaves) is ignored.
  os.makedirs(os.path.join(d, "8.orbax-checkpoint-tmp-1234"))
  target = {"w": jax.ShapeDtypeStruct((6,), np.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with C.TrainCheckpointer(d, keep=2) as ckpt:
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    state, extra = ckpt.restore(target)
    np.testing.assert_array_equal(state["w"], tree["w"] + 6)
    assert extra == {"step": 6}


def test_corrupt_train_checkpoint_fails_naming_step(tmp_path):
  d = str(tmp_path / "train")
  target = {"w": jax.ShapeDtypeStruct((6,), np.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  with C.TrainCheckpointer(d) as ckpt:
    ckpt.save(3, {"w": np.ones(6, np.float32)}, {})
  os.remove(os.path.join(d, "3", "state", "manifest.ocdbt"))
  with C.TrainCheckpointer(d) as ckpt:
    with pytest.raises(C.CheckpointError, match=os.path.join(d, "3")):
      ckpt.restore(target)


def test_check_model_config_compares_the_recorded_model(params8, tmp_path):
  """The run's base-checkpoint check: equal but for max_seq_len / dtypes passes; a
  switch that changes no shape (QK-norm off vs on changes shapes, a norm offset does not)
  fails in one line naming it; metadata without a model config is not checked."""
  path = str(tmp_path / "base")
  recorded = dict(vars(tiny_cfg()), head_dim=0, max_seq_len=64, dtype="bfloat16")
  C.save_params(path, params8, {"model": recorded})
  C.check_model_config(path, tiny_cfg(), "base.path")  # max_seq_len 16, float32: the run's
  with pytest.raises(C.CheckpointError) as e:
    C.check_model_config(path, tiny_cfg(norm_unit_offset=True), "base.path")
  assert str(e.value) == (f"base.path={path}: the checkpoint holds another model than "
                          "config.model: model.norm_unit_offset=True (checkpoint: False); set "
                          "these config.model fields to the checkpoint's values")
  other = str(tmp_path / "by_hand")
  C.save_params(other, params8, {"note": "no model config"})
  C.check_model_config(other, tiny_cfg(norm_unit_offset=True), "base.path")


def test_orbax_orphan_task_reports_are_dropped_and_others_pass():
  """asyncio's late "never retrieved" tracebacks of Orbax's tasks (a failed save's
  siblings) are dropped; any other asyncio report still reaches the handlers."""
  import logging
  from restem_jax import checkpoints  # noqa: F401  (installs the filter)
  seen = []

  class Keep(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())
  logger = logging.getLogger("asyncio")
  handler, level = Keep(), logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.ERROR)  # A failed read earlier in this process may have quieted it.
  try:
    logger.error("Task exception was never retrieved\nfuture: <Task finished coro=<write() "
                 "defined at /x/site-packages/orbax/checkpoint/_src/serialization.py:1>>")
    logger.error("Task exception was never retrieved\nfuture: <Task finished coro=<mine()>>")
    logger.error("Unclosed client session")
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
  assert len(seen) == 2 and "mine()" in seen[0] and seen[1] == "Unclosed client session"
