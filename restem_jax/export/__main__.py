r"""CLI: export a run's model as an HF directory or a GGUF file.

    python -m restem_jax.export --workdir=W --iteration=best --format=hf --out=DIR
    python -m restem_jax.export --model=W/iter_002/model --format=gguf --out=model.gguf

--iteration: "best" (restem_jax.export.best_iteration), a number, "base" or "sft".
--model: a saved model (an Orbax params or LoRA adapters checkpoint); its workdir (for the
tokenizer) is --workdir, else the directory two levels up. LoRA iterates are merged
onto their recorded base, by the restore the run itself uses (improve.restore_model).
Bad input (no such iteration, a model the format cannot express): one line, exit 2,
before the weights are read where it can be known then.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from absl import app, flags

from restem_jax.export import FORMATS, ExportError, best_iteration

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (tokenizer, iterations).")
_MODEL = flags.DEFINE_string("model", None, "A saved model: WORKDIR/iter_NNN/model, ...")
_ITERATION = flags.DEFINE_string("iteration", None, '"best", a number, "base" or "sft".')
_FORMAT = flags.DEFINE_enum("format", "hf", list(FORMATS), "hf: a transformers directory; "
                            "gguf: one llama.cpp file.")
_OUT = flags.DEFINE_string("out", None, "Output directory (hf) or .gguf file (gguf).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "HF safetensors dtype.")
_GGUF_TYPE = flags.DEFINE_enum("gguf_type", "f32", ["f32", "f16", "bf16", "q8_0"],
                               "GGUF tensor type of the matrices (norms stay f32).")
flags.mark_flags_as_required(["out"])


def model_path(workdir: str | None, model: str | None, iteration: str | None) -> tuple[str, str]:
  """(checkpoint path, workdir) named by the flags; ExportError on a bad combination."""
  from restem_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  if bool(model) == bool(iteration):
    raise ExportError("pass exactly one of --model=PATH and --iteration=best|N|base|sft")
  if model:
    workdir = workdir or os.path.dirname(os.path.dirname(os.path.abspath(model)))
    if not wd.exists(model):
      raise ExportError(f"--model={model}: no such checkpoint")
    return model, workdir
  if not workdir:
    raise ExportError("--iteration needs --workdir")
  if not wd.exists(os.path.join(workdir, "config.json")):
    raise ExportError(f"--workdir={workdir}: no config.json (not a run's workdir)")
  layout = wd.Layout(workdir)
  if iteration == "best":
    iteration = best_iteration(workdir)
  if iteration in ("base", "000"):
    m = layout.base
  elif iteration == "sft":
    m = layout.sft
  elif iteration.isdigit():
    m = layout.iteration(int(iteration))
  else:
    raise ExportError(f'--iteration={iteration!r} is not "best", a number, "base" or "sft"')
  if not wd.exists(m.model):
    raise ExportError(f"--iteration={iteration}: {m.model} does not exist")
  return m.model, workdir


def saved_config(path: str) -> Any:
  """The ModelConfig recorded with a saved model (runs and imports record it)."""
  # pylint: disable=import-outside-toplevel
  from restem_jax import checkpoints, model
  meta = checkpoints.read_metadata(path)
  if not isinstance(meta.get("model"), dict):
    raise ExportError(f"{path}: its metadata records no model config; export needs it")
  return model.ModelConfig.from_config(meta["model"])


def load_params(path: str, cfg: Any) -> Any:
  """The params of a saved model on one device, LoRA adapters merged onto their base."""
  # pylint: disable=import-outside-toplevel
  import jax
  from restem_jax import configlib, improve, partitioning
  mesh_cfg = configlib.default_config().mesh
  mesh_cfg.shape = (1, 1, 1)
  mesh = partitioning.make_mesh(mesh_cfg, jax.devices()[:1])
  return improve.restore_model(path, cfg, mesh).params


def export(path: str, workdir: str, fmt: str, out: str, dtype: str = "float32",
           gguf_type: str = "f32") -> None:
  """Writes the model saved at `path` (with `workdir`'s tokenizer) to `out`."""
  # pylint: disable=import-outside-toplevel
  from restem_jax.export import gguf as gguf_export, hf as hf_export, tokenizer as export_tokenizer
  cfg = saved_config(path)
  if fmt == "gguf":  # Refuses an inexpressible model before the weights are read.
    gguf_export.check_exportable(cfg, gguf_type)
  hf_export.hf_config(cfg)
  vocab, source_gguf = export_tokenizer.run_vocabulary(workdir)
  params = load_params(path, cfg)
  if fmt == "hf":
    hf_export.write_hf(out, cfg, params, vocab, dtype=dtype)
  else:
    gguf_export.write_gguf(out, cfg, params, vocab, tensor_type=gguf_type,
                           tokenizer_gguf=source_gguf)


def main(argv: list[str]) -> None:
  del argv
  # pylint: disable=import-outside-toplevel
  from restem_jax import checkpoints, errors, workdir as wd
  from restem_jax.importers import ImportFormatError
  start = time.perf_counter()
  try:
    path, workdir = model_path(_WORKDIR.value, _MODEL.value, _ITERATION.value)
    export(path, workdir, _FORMAT.value, _OUT.value, _DTYPE.value, _GGUF_TYPE.value)
  except (ExportError, ImportFormatError, checkpoints.CheckpointError, errors.ConfigError,
          wd.WorkdirError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(f"exported {path} -> {_OUT.value} ({_FORMAT.value}) in "
        f"{time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  app.run(main)
