r"""Kill a run at K random moments, resume it each time, compare its end with an unkilled run.

    nice python scripts/chaos.py --kills=20 --seed=0 --out=/tmp/chaos
    nice python scripts/chaos.py --kills=3 --reference=/tmp/restem_tiny --out=/tmp/chaos

Runs `python -m restem_jax.main --config=<config> --workdir=<out>/chaos` over and over;
each attempt is stopped by one seeded random fault, then rerun, until K faults were
dealt; a last run finishes the job. Faults (each attempt draws one):

  time   SIGKILL at a random moment (the process group: grader workers too)
  term   SIGTERM at a random moment (preemption): the run must stop by itself with
         status 75 (or 0 if it had just finished); SIGKILL after 60 s as a pod would
  ckpt   SIGKILL while an Orbax checkpoint is being written (its temporary
         directory exists)
  shard  SIGKILL while an E-step shard / stats file is being written (its .tmp_ file
         exists)

Random moments are drawn over the work the reference run still had left at the
attempt's resume point, K - k kills sharing it, so kills land in every phase,
not only near the start. The file-triggered kills poll the workdir every few
milliseconds; to make the windows wide enough to hit, the child's os.fsync
(called by every atomic write before its rename) sleeps --write_delay seconds.
That changes timing only, not what is written.

The end state must equal the reference's: every eval.json (all fields, exact),
the kept samples and per-problem stats of every E-step (every line), and
progress.json. Prints the kills per phase and per kind, and "identical" or the
differences; exit status 0 iff identical. The reference is --reference (a finished
workdir of the same config) or an unkilled run made first in <out>/reference.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED = 75  # restem_jax.preemption.EXIT_CODE (not imported: this script imports no JAX)

# The child: main.py with os.fsync slowed down (widens the atomic-write windows).
_CHILD = r"""
import os, sys, time
delay = float(os.environ.get("CHAOS_WRITE_DELAY", "0"))
if delay > 0:
  _fsync = os.fsync
  def fsync(fd):
    _fsync(fd)
    time.sleep(delay)
  os.fsync = fsync
import runpy
sys.argv = ["restem_jax.main"] + sys.argv[1:]
runpy.run_module("restem_jax.main", run_name="__main__", alter_sys=True)
"""


def child_env(write_delay: float) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, as a user run.
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["CHAOS_WRITE_DELAY"] = str(write_delay)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def command(config: str, workdir: str) -> list[str]:
  return [sys.executable, "-c", _CHILD, f"--config={config}", f"--workdir={workdir}"]


def done(workdir: str) -> list[str]:
  try:
    with open(os.path.join(workdir, "progress.json")) as f:
      return json.load(f)["done"]
  except (OSError, ValueError, KeyError):
    return []


def _output_of(workdir: str, phase: str) -> str:
  """The file or directory whose mtime says when `phase` finished (progress.json names)."""
  kind, _, name = phase.partition("_")
  d = {"000": "base_eval", "sft": "sft"}.get(name, f"iter_{name}")
  if phase == "base":
    return os.path.join(workdir, "base")
  if kind == "eval":
    return os.path.join(workdir, d, "eval.json")
  if kind == "generate":
    stats = glob.glob(os.path.join(workdir, d, "samples", "stats_*.jsonl"))
    return max(stats, key=os.path.getmtime) if stats else os.path.join(workdir, d, "samples")
  return os.path.join(workdir, d, "model")  # improve_NNN / improve_sft


def timeline(workdir: str) -> tuple[list[str], dict[str, float]]:
  """The reference's phases in order, and when each finished (s after config.json)."""
  phases = done(workdir)
  t0 = os.path.getmtime(os.path.join(workdir, "config.json"))
  return phases, {p: os.path.getmtime(_output_of(workdir, p)) - t0 for p in phases}


def _temporaries(workdir: str, kind: str) -> set[str]:
  """Temporary files / directories of unfinished writes: Orbax's (and save_params' .new)
  for "ckpt", the atomic writes' .tmp_ files of E-step shards for "shard"."""
  if kind == "ckpt":
    return set(glob.glob(os.path.join(workdir, "**", "*orbax-checkpoint-tmp*"), recursive=True)
               + glob.glob(os.path.join(workdir, "**", "*.new"), recursive=True))
  return set(glob.glob(os.path.join(workdir, "*", "samples", ".tmp_*")))


def in_flight(workdir: str, before: dict[str, set[str]]) -> dict[str, bool]:
  """Which writes the kill cut short: temporaries that did not exist when the attempt
  started (a killed write leaves its temporary until a later run cleans it up)."""
  return {kind: bool(_temporaries(workdir, kind) - before[kind]) for kind in ("ckpt", "shard")}


def attempt(cfg: argparse.Namespace, workdir: str, kind: str, delay: float) -> dict:
  """One run, stopped by `kind` after `delay` s (counted from its config.json write)."""
  before = os.path.getmtime(os.path.join(workdir, "config.json")) if os.path.exists(
      os.path.join(workdir, "config.json")) else -1.0
  p = subprocess.Popen(command(cfg.config, workdir), cwd=ROOT, env=child_env(cfg.write_delay),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       start_new_session=True)
  stale = {k: _temporaries(workdir, k) for k in ("ckpt", "shard")}
  started, armed_at = time.time(), None
  fired = None
  while p.poll() is None:
    now = time.time()
    if armed_at is None:
      cfg_path = os.path.join(workdir, "config.json")
      if kind == "startup" or (os.path.exists(cfg_path) and os.path.getmtime(cfg_path) > before):
        armed_at = now
    if armed_at is not None and now - armed_at >= delay:
      if kind in ("time", "startup") or (kind in ("ckpt", "shard")
                                         and _temporaries(workdir, kind) - stale[kind]):
        os.killpg(p.pid, signal.SIGKILL)
        fired = "SIGKILL"
      elif kind == "term":
        p.send_signal(signal.SIGTERM)
        fired = "SIGTERM"
      if fired:
        break
    if now - started > cfg.attempt_timeout:
      os.killpg(p.pid, signal.SIGKILL)
      fired = "SIGKILL (attempt timeout)"
      break
    time.sleep(0.004)
  flight = in_flight(workdir, stale) if fired == "SIGKILL" else {"ckpt": False, "shard": False}
  try:
    _, err = p.communicate(timeout=60)
  except subprocess.TimeoutExpired:  # SIGTERM not honoured in time: what a pod does next.
    os.killpg(p.pid, signal.SIGKILL)
    _, err = p.communicate()
    fired = "SIGTERM then SIGKILL after 60 s"
  try:
    os.killpg(p.pid, signal.SIGKILL)  # Grader workers left in the group, if any.
  except ProcessLookupError:
    pass
  return {"kind": kind, "fired": fired, "rc": p.returncode, "flight": flight,
          "last_line": (err.strip().splitlines() or [""])[-1][:300]}


def _lines(paths: list[str]) -> list[str]:
  out = []
  for path in paths:
    with open(path) as f:
      out += [line for line in f.read().splitlines() if line.strip()]
  return sorted(out)


def compare(ref: str, got: str) -> list[str]:
  """Differences between two finished workdirs' results (empty: identical)."""
  diffs = []
  if done(ref) != done(got):
    diffs.append(f"progress.json: {done(ref)} vs {done(got)}")
  evals = {os.path.relpath(p, ref) for p in glob.glob(os.path.join(ref, "*", "eval.json"))}
  evals |= {os.path.relpath(p, got) for p in glob.glob(os.path.join(got, "*", "eval.json"))}
  for rel in sorted(evals):
    try:
      with open(os.path.join(ref, rel)) as fa, open(os.path.join(got, rel)) as fb:
        a, b = json.load(fa), json.load(fb)
    except (OSError, ValueError) as e:
      diffs.append(f"{rel}: {e}")
      continue
    if a != b:
      keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      diffs.append(f"{rel}: differs at {keys[:6]}")
  dirs = sorted({os.path.basename(os.path.dirname(d))
                 for w in (ref, got) for d in glob.glob(os.path.join(w, "*", "samples"))})
  for kind in ("shard", "stats"):
    for d in dirs:
      a = _lines(sorted(glob.glob(os.path.join(ref, d, "samples", f"{kind}_*.jsonl"))))
      b = _lines(sorted(glob.glob(os.path.join(got, d, "samples", f"{kind}_*.jsonl"))))
      if a != b:
        diffs.append(f"{d}/samples {kind} lines differ ({len(a)} vs {len(b)} lines)")
  return diffs


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--kills", type=int, default=3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True, help="a new directory for the run(s)")
  ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
  ap.add_argument("--reference", default="", help="a finished workdir of --config; else made")
  ap.add_argument("--write_delay", type=float, default=0.05)
  ap.add_argument("--attempt_timeout", type=float, default=900.0)
  cfg = ap.parse_args()
  rng = random.Random(cfg.seed)
  os.makedirs(cfg.out, exist_ok=True)
  ref = cfg.reference
  if not ref:
    ref = os.path.join(cfg.out, "reference")
    print(f"reference run in {ref} ...", flush=True)
    p = subprocess.run(command(cfg.config, ref), cwd=ROOT, env=child_env(0.0),
                       capture_output=True, text=True)
    if p.returncode != 0:
      print(p.stderr[-3000:])
      return 2
  phases, finished_at = timeline(ref)
  total = max(finished_at.values())
  workdir = os.path.join(cfg.out, "chaos")
  if os.path.exists(os.path.join(workdir, "progress.json")):
    print(f"{workdir} exists; use a new --out", file=sys.stderr)
    return 2

  log, per_phase, per_kind, during = [], collections.Counter(), collections.Counter(), \
      collections.Counter()
  k, bad_terms = 0, []
  while k < cfg.kills:
    now_done = done(workdir)
    if len(now_done) == len(phases):
      print(f"the run finished after {k} kills; the rest are not dealt")
      break
    left = total - max([finished_at[p] for p in now_done if p in finished_at], default=0.0)
    span = 2.0 * left / (cfg.kills - k)  # K - k kills share what is left: mean span / 2
    kinds = ["time", "term", "ckpt", "startup"]
    if any(p.startswith("generate") and p not in now_done for p in phases):
      kinds.append("shard")
    kind = rng.choice(kinds)
    delay = rng.uniform(0, 8.0) if kind == "startup" else rng.uniform(0, span)
    phase = next(p for p in phases if p not in now_done)
    r = attempt(cfg, workdir, kind, delay)
    after = done(workdir)
    stopped_in = next((p for p in phases if p not in after), "finished")
    r.update(delay=round(delay, 2), phase=stopped_in, resumed_at=phase)
    log.append(r)
    if r["fired"] is None:  # The run ended before the fault fired.
      ok = r["rc"] == 0 and stopped_in == "finished"
      print(f"attempt {len(log)}: {kind} not fired (run ended, rc {r['rc']}): "
            f"{r['last_line']}", flush=True)
      if not ok:
        print("the run failed by itself", file=sys.stderr)
        return 1
      continue
    if kind == "term" and r["rc"] not in (PREEMPTED, 0):
      bad_terms.append(f"kill {k + 1}: SIGTERM gave status {r['rc']} ({r['fired']}), not "
                       f"{PREEMPTED}: {r['last_line']}")
    k += 1
    per_phase[stopped_in] += 1
    per_kind[kind] += 1
    for what, hit in r["flight"].items():
      during[what] += hit
    print(f"kill {k}/{cfg.kills}: {kind:7s} after {delay:6.2f}s -> stopped in {stopped_in:13s} "
          f"rc {r['rc']} {'(checkpoint save cut) ' if r['flight']['ckpt'] else ''}"
          f"{'(shard write cut) ' if r['flight']['shard'] else ''}{r['last_line'][:120]}",
          flush=True)

  p = subprocess.run(command(cfg.config, workdir), cwd=ROOT, env=child_env(0.0),
                     capture_output=True, text=True)
  if p.returncode != 0:
    print(f"the final resume failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return 1
  diffs = compare(ref, workdir)
  print(f"\nkills per phase: " + ", ".join(f"{ph} {per_phase[ph]}" for ph in phases
                                           if per_phase[ph]))
  print("kills per kind: " + ", ".join(f"{kd} {n}" for kd, n in sorted(per_kind.items())))
  print(f"cut mid-write: checkpoint save {during['ckpt']}, shard write {during['shard']}")
  term = [r for r in log if r["kind"] == "term" and r["fired"]]
  print(f"SIGTERM exits: " + ", ".join(str(r["rc"]) for r in term))
  with open(os.path.join(cfg.out, "chaos.json"), "w") as f:
    json.dump({"kills": log, "per_phase": per_phase, "per_kind": per_kind,
               "cut": during, "diffs": diffs, "bad_sigterm": bad_terms}, f, indent=1)
  if bad_terms:
    print("SIGTERM not handled as a preemption:\n  " + "\n  ".join(bad_terms))
  if diffs:
    print("NOT identical:\n  " + "\n  ".join(diffs))
  if diffs or bad_terms:
    return 1
  print(f"identical: every eval.json, kept sample and stats line of {len(phases)} phases "
        "matches the unkilled run")
  return 0


if __name__ == "__main__":
  sys.exit(main())
