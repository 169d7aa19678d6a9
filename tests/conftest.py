"""Test session setup: CPU only, 8 fake devices (set before jax is imported).

Single-device references use a mesh over `jax.devices()[:1]`, so one process
covers both the 8-device and the 1-device runs that the sharding tests compare.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# TensorFlow (pulled in by seqio) must not grab every core or print banners.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
