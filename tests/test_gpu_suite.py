"""The GPU suite's dry run (tiny sizes, CPU): every part still runs and prints its row."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

pytestmark = pytest.mark.slow  # Compiles every part of the suite at its tiny sizes.


def test_gpu_suite_dry_run_prints_every_row(capsys):
  import gpu_suite  # pylint: disable=import-outside-toplevel
  rows = gpu_suite.main(["--tiny"])
  printed = capsys.readouterr().out
  assert all(r in printed for r in rows)
  assert all(r.startswith("| ") and r.endswith(" |") and r.count(" | ") == 4 for r in rows)
  # decode: greedy and top-k, at each tiny batch; no HBM peak is known for a CPU.
  decode = [r for r in rows if r.startswith("| decode ")]
  assert len(decode) == 2 * len(gpu_suite.TINY.batches)
  assert all("n/a of HBM peak" in r for r in decode)
  # kv-cache vs no-cache: in float32 the cached greedy tokens equal the uncached ones.
  (nocache,) = [r for r in rows if r.startswith("| kv-cache vs no-cache ")]
  assert "greedy tokens equal at 100% of positions" in nocache
  # tunix: its tiny rows, or the one-line reason it was skipped.
  tunix = [r for r in rows if "tunix" in r or r.startswith("| tiny |")]
  assert tunix and ("skipped: google-tunix is not installed" in tunix[0]
                    or all(r.startswith("| tiny |") for r in tunix))
  # MFU: a finite loss and tokens per step = batch x length.
  (mfu,) = [r for r in rows if r.startswith("| train step MFU ")]
  t = gpu_suite.TINY
  assert f"{t.train_batch} x {t.train_len} = {t.train_batch * t.train_len:,} tokens" in mfu
  assert "MFU n/a" in mfu and "loss nan" not in mfu
