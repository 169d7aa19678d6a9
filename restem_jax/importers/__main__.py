"""CLI: python -m restem_jax.importers --format=gguf|hf --src=PATH --out=WORKDIR/base

Writes the params checkpoint to --out and the tokenizer beside it
(WORKDIR/tokenizer.json + tokenizer_config.json, what a run's task.vocab_path
names), as base.source = "import" does. An existing --out is kept (nothing is read).
"""
from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from restem_jax import configlib, partitioning
from restem_jax.importers import FORMATS, ImportFormatError, import_to

_FORMAT = flags.DEFINE_enum("format", None, list(FORMATS), "Checkpoint format of --src.")
_SRC = flags.DEFINE_string("src", None, "A .gguf file or an HF safetensors directory.")
_OUT = flags.DEFINE_string("out", None, "Output checkpoint directory (e.g. $WORKDIR/base).")
_MAX_SEQ_LEN = flags.DEFINE_integer(
    "max_seq_len", 2048, "Context (KV-cache) length: min(the model's own, this).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Compute dtype recorded in the model config.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16", "float16"],
                                 "Dtype the weights are stored in.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"],
                          "Mesh (data, fsdp, tensor) the params are placed on while importing.")
flags.mark_flags_as_required(["format", "src", "out"])


def main(argv: list[str]) -> None:
  del argv
  mesh_cfg = configlib.default_config().mesh
  mesh_cfg.shape = tuple(int(x) for x in _MESH.value)
  mesh = partitioning.make_mesh(mesh_cfg)
  start = time.perf_counter()
  try:
    result = import_to(_OUT.value, _SRC.value, mesh, fmt=_FORMAT.value,
                       max_seq_len=_MAX_SEQ_LEN.value, dtype=_DTYPE.value,
                       param_dtype=_PARAM_DTYPE.value)
  except ImportFormatError as e:  # Bad input: one line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  cfg = result.model
  if result.imported:
    print(f"imported {_SRC.value} -> {_OUT.value} in {time.perf_counter() - start:.1f}s; "
          f"tokenizer -> {result.tokenizer_path}")
  else:
    print(f"{_OUT.value} already holds an import; kept (remove it to import again)")
  print("model config (set these as config.model.*):")
  print(json.dumps({k: v for k, v in vars(cfg).items()}, indent=2))


if __name__ == "__main__":
  app.run(main)
