"""Orbax checkpoints: whole-model params (base, per-iteration best) and resumable train state.

Both kinds restore onto ANY mesh: restore targets are ShapeDtypeStructs that carry
the *current* mesh's shardings (orbax reshards on read), never the saved topology.

Atomicity comes from Orbax: a checkpoint is written into a temporary directory
and renamed into place when complete, and CheckpointManager ignores unfinished
temporaries, so a half-written checkpoint is never picked up. Every failure to
read a checkpoint is a CheckpointError naming the path: nothing here silently
falls back to fresh params.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import logging
import os
import uuid
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from restem_jax import distributed
from restem_jax import model as model_lib

_PARAMS, _META = "params", "metadata"
_STATE, _EXTRA = "state", "extra"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names the path and the fix."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint that is missing, incomplete or unreadable (not merely another config's):
  the run recomputes what wrote it (run.RunContext.resumable, improve's fallback)."""


def _one_line(e: BaseException, limit: int = 300) -> str:
  msg = " ".join(f"{type(e).__name__}: {e}".split())
  return msg if len(msg) <= limit else msg[:limit] + "..."


# ----------------------------------------------------------------------------- params


class _OrbaxOrphanTasks(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" reports of Orbax's own tasks.

  Orbax writes (and reads) arrays in asyncio tasks; when one fails (a full disk), its
  sibling tasks' failures are reported again as multi-line tracebacks whenever the garbage
  collector takes them: for an async save, in Orbax's background thread, before the failure
  reaches us. The failure itself does reach the caller, which names the directory in one
  line (CheckpointError). Installed on the asyncio logger at import; other asyncio reports
  pass (this code base runs no asyncio of its own). Reads keep their own scoped silence
  (_orphan_reads_quieted): a failed read's orphans are TensorStore futures wrapped by
  asyncio (coro `_wrap_awaitable`), whose reports name neither Orbax nor our code
  (checked on a params checkpoint with garbled array files), so no filter can tell them
  apart from another library's."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("Task exception was never retrieved") and "orbax" in msg)


logging.getLogger("asyncio").addFilter(_OrbaxOrphanTasks())


@contextlib.contextmanager
def _orphan_reads_quieted() -> Iterator[None]:
  """Around an Orbax read. Orbax reads arrays in asyncio tasks; when one read fails, its
  sibling reads are reported again, when collected, by asyncio's "Task exception was never
  retrieved" handler as multi-line tracebacks, sometimes before the failure reaches us
  (collected inside Orbax's own cleanup). The caller names the damaged checkpoint in one
  line; those duplicates go. The asyncio logger is quiet during the read and stays quiet
  only after a failure (orphans may be collected later); this code base runs no asyncio
  of its own.
  """
  logger = logging.getLogger("asyncio")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  ok = False
  try:
    yield
    ok = True
  finally:
    if ok:
      logger.setLevel(level)


def _params_checkpointer() -> ocp.Checkpointer:
  # Handlers named up front, so metadata() and partial restores know each item.
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{
      _PARAMS: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}))


def save_params(path: str, params: Any, metadata: dict | None = None) -> None:
  """Writes params (+ JSON metadata, e.g. the model config) atomically to `path`.

  An existing checkpoint at `path` is replaced: the new one is completed in a
  sibling directory first and swapped in with renames, so a crash leaves either
  the old or the new checkpoint (or, in the instant between the two renames,
  none at `path`: restore then fails loudly instead of reading a mix).
  """
  path_p = epath.Path(path)
  # One name on every host (Orbax's processes meet in the same directory); a
  # leftover from a save that crashed is cleared first.
  tmp = path_p.parent / f"{path_p.name}.new"
  if jax.process_index() == 0 and tmp.exists():
    tmp.rmtree()
  distributed.sync(f"restem_save_params_start:{path}")
  ckptr = _params_checkpointer()
  try:
    ckptr.save(tmp, args=ocp.args.Composite(**{
        _PARAMS: ocp.args.StandardSave(params),
        _META: ocp.args.JsonSave(dict(metadata or {}))}))
  except Exception as e:  # ENOSPC, permissions: from tensorstore/Orbax, many types.
    if jax.process_index() == 0:  # Give the space back: the half save is of no use.
      for leftover in path_p.parent.glob(f"{tmp.name}*"):
        leftover.rmtree() if leftover.is_dir() else leftover.unlink()
    raise _cannot_save(path, e) from e
  finally:
    ckptr.close()
  if jax.process_index() == 0:
    old = None
    if path_p.exists():
      old = path_p.parent / f"{path_p.name}.old-{uuid.uuid4().hex[:8]}"
      path_p.rename(old)
    tmp.rename(path_p)
    if old is not None:
      old.rmtree()
  distributed.sync(f"restem_save_params_done:{path}")


def _disk_full(e: BaseException | None) -> bool:
  """Whether ENOSPC is behind `e` (tensorstore and Orbax wrap it in their own types)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or \
        "No space left on device" in str(e) or "ENOSPC" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _cannot_save(path: str, e: BaseException) -> CheckpointError:
  why = "No space left on device" if _disk_full(e) else _one_line(e)
  return CheckpointError(f"cannot save a checkpoint in {path} ({why}); free disk space (or fix "
                         "permissions) and rerun the same command: the run resumes from its "
                         "last complete checkpoint")


def _check_exists(path: str, what: str) -> epath.Path:
  p = epath.Path(path)
  if not p.exists():
    raise DamagedCheckpointError(
        f"no {what} checkpoint at {path}: the directory does not exist; check the path (or "
        "create it with checkpoints.save_params)")
  return p


def abstract_params_on(model_cfg: model_lib.ModelConfig, mesh: Mesh) -> Any:
  """Restore targets: the params' ShapeDtypeStructs with this mesh's shardings."""
  abstract = nn.unbox(model_lib.abstract_params(model_cfg))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, model_lib.param_shardings(model_cfg, mesh))


def _check_tree_matches(path: str, stored: Any, target: Any, what: str,
                        expected: str = "the model config") -> None:
  """Same keys and shapes as the target, or a CheckpointError naming the difference."""
  def name(k):  # Orbax's metadata turns attributes/tuples into dict keys/lists.
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  def flat(tree):
    return {"/".join(name(k) for k in path): tuple(getattr(v, "shape", ()))
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}
  s, t = flat(stored), flat(target)
  if set(s) != set(t):
    missing, extra = sorted(set(t) - set(s)), sorted(set(s) - set(t))
    raise CheckpointError(
        f"{what} checkpoint at {path} does not match {expected}: missing "
        f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
        f"{extra[:4]}{'...' if len(extra) > 4 else ''}; restore with the config it was saved with")
  bad = [(k, s[k], t[k]) for k in sorted(t) if s[k] != t[k]]
  if bad:
    k, got, want = bad[0]
    raise CheckpointError(
        f"{what} checkpoint at {path} does not match {expected}: {k} has shape {got}, "
        f"the config needs {want} ({len(bad)} mismatched arrays); restore with the config "
        "it was saved with")


def _keys(tree: Any) -> set[str]:
  """Every dict key anywhere in a (metadata) tree."""
  if isinstance(tree, dict):
    return set(tree).union(*(_keys(v) for v in tree.values()))
  if isinstance(tree, (list, tuple)):
    return set().union(*(_keys(v) for v in tree))
  return set()


def restore_params(path: str, model_cfg: model_lib.ModelConfig, mesh: Mesh) -> Any:
  """Params saved by save_params, placed on `mesh` with model.param_shardings."""
  target = abstract_params_on(model_cfg, mesh)

  def layout(stored: Any) -> Any:
    # Checkpoints written before per-layer params hold params["layers"] stacked
    # [n_layers, ...] (model.py): restored in that layout, then split.
    if isinstance(stored, dict) and model_lib.STACKED_KEY in stored:
      return model_lib.stacked_layout(model_cfg, target)
    return target
  out = _restore_tree(path, layout, "params")
  if jax.tree.structure(out) != jax.tree.structure(target):
    return model_lib.unstack_layout(model_cfg, out, jax.tree.map(lambda a: a.sharding, target))
  return out


def restore_adapters(path: str, abstract: Any) -> Any:
  """LoRA adapters saved by save_params (an iteration's model with train.lora), placed as
  `abstract` (lora.Adapters.abstract(): shapes with this mesh's shardings) says."""
  return _restore_tree(path, lambda _: abstract, "adapters",
                       expected="the adapters of the LoRA config recorded with it")


def _restore_tree(path: str, target_for: Callable[[Any], Any], what: str,
                  expected: str = "the model config") -> Any:
  """The pytree saved at `path`, restored onto target_for(stored tree metadata): same keys
  and shapes or a CheckpointError naming the difference; unreadable: DamagedCheckpointError."""
  _check_exists(path, what)
  ckptr = _params_checkpointer()
  try:
    try:
      with _orphan_reads_quieted():
        stored = ckptr.metadata(path).item_metadata[_PARAMS]
    except Exception as e:  # Orbax raises many types for damaged directories.
      raise DamagedCheckpointError(
          f"{what} checkpoint at {path} is unreadable ({_one_line(e)}); re-create it "
          "(save_params) or point to another path") from e
    if stored is None:
      raise DamagedCheckpointError(f"{what} checkpoint at {path} has no '{_PARAMS}' item; "
                                   "it was not written by checkpoints.save_params")
    stored = getattr(stored, "tree", stored)
    want = target_for(stored)
    _check_tree_matches(path, stored, want, what, expected)
    try:
      with _orphan_reads_quieted():
        out = ckptr.restore(path, args=ocp.args.Composite(
            **{_PARAMS: ocp.args.StandardRestore(want)}))
    except Exception as e:
      raise DamagedCheckpointError(
          f"{what} checkpoint at {path} is corrupt or incomplete ({_one_line(e)}); re-create "
          "it or point to another path") from e
  finally:
    ckptr.close()
  return out[_PARAMS]


def read_metadata(path: str) -> dict:
  """The JSON metadata saved beside the params."""
  _check_exists(path, "params")
  ckptr = _params_checkpointer()
  try:
    out = ckptr.restore(path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
  except Exception as e:
    raise DamagedCheckpointError(f"metadata of checkpoint at {path} is unreadable "
                                 f"({_one_line(e)}); re-create it with save_params") from e
  finally:
    ckptr.close()
  return dict(out[_META] or {})


def check_model_config(path: str, model_cfg: model_lib.ModelConfig, field: str) -> None:
  """The model config recorded with the params at `path` (importers and runs record it)
  must equal the run's, but for model.RUN_FIELDS: restore_params checks shapes only, and
  a RoPE scaling or a norm offset that differs changes no shape, only every output.
  A CheckpointError names the differing fields in one line; metadata without a model
  config (params saved by hand) is not checked."""
  stored = read_metadata(path).get("model")
  if not isinstance(stored, dict):
    return
  known = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
  try:  # Fields it does not record (older metadata) count as equal.
    got = dataclasses.replace(model_cfg, **{k: v for k, v in stored.items() if k in known})
  except (ValueError, TypeError) as e:  # ConfigError is a ValueError.
    raise CheckpointError(f"{field}={path}: the model config recorded with the checkpoint is "
                          f"not a valid one ({_one_line(e)}); re-create the checkpoint") from e
  diff = model_lib.config_mismatches(got, model_cfg, ignore=model_lib.RUN_FIELDS)
  if diff:
    raise CheckpointError(f"{field}={path}: the checkpoint holds another model than "
                          f"config.model: {diff}; set these config.model fields to the "
                          "checkpoint's values")


# ----------------------------------------------------------------------------- train state


class TrainCheckpointer:
  """Mid-phase checkpoints for resume: any state pytree + a JSON dict per step.

  `state` is whatever pytree the caller needs back (improve saves the train
  state together with the best-so-far params, so both are consistent at every
  step); `extra` holds host bookkeeping (data position, early-stop counters).
  Saves are asynchronous when enabled: the device->host copy happens in save(),
  the file writing in the background; wait() / close() block until it is done.
  """

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    self.directory = os.fspath(directory)
    # cleanup_tmp_directories: a save cut short (kill, full disk) leaves a temporary
    # directory; the next manager removes it instead of letting them pile up.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    try:
      self._mgr = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                         _EXTRA: ocp.JsonCheckpointHandler()})
    except Exception as e:
      raise CheckpointError(f"cannot open checkpoint directory {self.directory} "
                            f"({_one_line(e)}); check the path and permissions") from e

  def save(self, step: int, state: Any, extra: dict) -> None:
    try:
      self._mgr.save(int(step), args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(copy.deepcopy(extra))}))
    except Exception as e:  # An earlier async save's error surfaces here too: name the dir.
      raise _cannot_save(self.directory, e) from e

  def latest_step(self) -> int | None:
    self._mgr.reload()  # Pick up steps written by an earlier (killed) process.
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    self._mgr.reload()
    return list(self._mgr.all_steps())

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state on the shardings of `abstract_state`'s ShapeDtypeStructs, extra)."""
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint in {self.directory}; nothing to resume from")
    where = os.path.join(self.directory, str(step))
    try:
      with _orphan_reads_quieted():
        stored = self._mgr.item_metadata(step)[_STATE]
    except Exception as e:
      raise DamagedCheckpointError(
          f"train checkpoint {where} is unreadable ({_one_line(e)}); delete that step "
          "directory to resume from an earlier one") from e
    if stored is None:
      raise DamagedCheckpointError(f"train checkpoint {where} has no '{_STATE}' item; delete "
                                   "that step directory to resume from an earlier one")
    stored = getattr(stored, "tree", stored)
    # Not a DamagedCheckpointError: the files are fine, and restore_latest must not delete them.
    if model_lib.STACKED_KEY in _keys(stored):
      raise CheckpointError(
          f"train checkpoint {where} holds layers stacked [n_layers, ...], the layout before "
          "per-layer params (model.py); resume it with the code that wrote it, or delete "
          f"{self.directory} to redo this M-step")
    _check_tree_matches(where, stored, abstract_state, "train",
                        "the model/optimizer config of this run")
    try:
      with _orphan_reads_quieted():
        out = self._mgr.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract_state),
            _EXTRA: ocp.args.JsonRestore()}))
    except Exception as e:
      raise DamagedCheckpointError(
          f"train checkpoint {where} is corrupt or incomplete ({_one_line(e)}); delete that "
          "step directory to resume from an earlier one") from e
    return out[_STATE], dict(out[_EXTRA] or {})

  def restore_latest(self, abstract_state: Any,
                     log: Callable[[str], None]) -> tuple[int, Any, dict] | None:
    """(step, state, extra) of the newest readable checkpoint, or None if there is none.

    A damaged newer one (missing or corrupt array files) is removed with a warning
    naming it: training from the step before it redoes the same steps (the data
    position is the step), and its directory would block saving that step again.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return (step,) + self.restore(abstract_state, step)
      except DamagedCheckpointError as e:
        logging.warning("%s; removing it and resuming from an earlier step", str(e).split(";")[0])
        log(f"improve: removed damaged checkpoint step {step}")
        if jax.process_index() == 0:
          epath.Path(self.directory, str(step)).rmtree()
        distributed.sync(f"restem_removed_damaged:{self.directory}/{step}")
        self._mgr.reload()
    return None

  def wait(self) -> None:
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # The background save failed (e.g. ENOSPC).
      raise _cannot_save(self.directory, e) from e

  def close(self) -> None:
    self.wait()
    self._mgr.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

