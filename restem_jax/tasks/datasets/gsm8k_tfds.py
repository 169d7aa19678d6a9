"""gsm8k_tfds: GSM8K from a TFDS data_dir prepared beforehand (never downloaded here).

Same problems, prompts and reward as gsm8k; only the reader differs. Ids
"gsm8k_tfds/<split>/<i>" index the TFDS order (TFDS shuffles examples by key
when preparing), not the official file's line numbers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from restem_jax import workdir as wd
from restem_jax.tasks.datasets import gsm8k


@dataclasses.dataclass(frozen=True)
class Gsm8kTfds(gsm8k.Gsm8k):

  def load(self, data_dir: str, split: Optional[str] = None):
    """tfds.load of the prepared gsm8k: a tf.data.Dataset (a dict of them for split=None).

    download=False, try_gcs=False: a missing dataset fails at once (tfds.load's default
    would try to download and, offline, retry for minutes) and becomes a DataLayoutError.
    """
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"task gsm8k_tfds needs tensorflow-datasets ({e})") from e
    try:
      return tfds.load("gsm8k", split=split, data_dir=data_dir, download=False,
                       try_gcs=False, shuffle_files=False)
    except Exception as e:  # pylint: disable=broad-except
      # AssertionError (not prepared), DatasetNotFoundError, bad dataset_info.json, ...
      why = " ".join(str(e).split())[:300]
      raise self.layout_error(
          data_dir, f"holds no readable TFDS gsm8k ({type(e).__name__}: {why})") from None

  def check_files(self, data_dir: str) -> None:
    if not wd.glob(data_dir, "gsm8k/*/dataset_info.json"):
      raise self.layout_error(data_dir, "has no prepared gsm8k/<version>/dataset_info.json")

  def check_readable(self, data_dir: str) -> None:
    splits = self.load(data_dir)  # Lazy datasets: fails fast, reads nothing yet.
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
      raise self.layout_error(data_dir, f"has a TFDS gsm8k without split(s) {missing}")

  def read(self, data_dir: str, split: str, task_cfg: Any = None) -> list[dict]:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    out = []
    for i, ex in enumerate(tfds.as_numpy(self.load(data_dir, split))):
      out.append(self.record(data_dir, f"gsm8k_tfds/{split}/{i:05d}",
                             ex["question"].decode("utf-8"), ex["answer"].decode("utf-8"),
                             f"TFDS gsm8k {split} example {i}"))
    return out


SPEC = Gsm8kTfds(**{
    **{f.name: getattr(gsm8k.SPEC, f.name) for f in dataclasses.fields(gsm8k.SPEC)},
    "name": "gsm8k_tfds",
    "layout": "<data_dir>/gsm8k/<version>/ (dataset_info.json, features.json, "
              "gsm8k-{train,test}.tfrecord-*) prepared by `tfds build gsm8k "
              "--data_dir=<data_dir>` on a machine with internet (never downloaded here)",
})
