"""quiet.filtered_stderr drops only the known native noise: other fd-2 lines, Python
tracebacks and log lines pass, in order, and fd 2 is restored after the block."""
import subprocess
import sys

from helpers import ROOT

SCRIPT = r"""
import os, sys
from restem_jax import quiet
print("before", file=sys.stderr, flush=True)
try:
  with quiet.filtered_stderr():
    os.write(2, b"normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty. use identity normalization.\n")
    os.write(2, b"E0000 00:00:1.0 123 cuda_platform.cc:52] failed call to cuInit: INTERNAL: x\n")
    os.write(2, b"E0000 00:00:1.0 123 real.cc:1] a real native error\n")
    print("a python line", file=sys.stderr)
    raise ValueError("boom")
finally:
  print("after", file=sys.stderr, flush=True)
"""


def test_noise_dropped_errors_and_tracebacks_kept_in_order():
  p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                     timeout=60)
  assert p.returncode == 1
  lines = p.stderr.splitlines()
  assert lines[:4] == ["before", "E0000 00:00:1.0 123 real.cc:1] a real native error",
                       "a python line", "after"], lines
  assert lines[-1] == "ValueError: boom" and "Traceback (most recent call last):" in lines
  assert not any("precompiled_charsmap" in l or "cuInit" in l for l in lines)
