"""Run outputs for people: the summary table, the pass@1 plot, TensorBoard, and
`load_run`, which reads a workdir back (colab/inspect_run.ipynb is built on it)."""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable, Sequence

import ml_collections
from etils import epath

from restem_jax import export, workdir as wd


@dataclasses.dataclass(frozen=True)
class RunFiles:
  """What a workdir holds so far, finished or not, as plain Python values (workdir.py: layout)."""
  config: ml_collections.ConfigDict | None  # config.json (None before the run wrote it)
  # One eval.json per evaluated model, iteration "000" (base), "001", ..., "sft" last.
  evals: list[dict]
  # Per E-step ("iter_001", ...): one row per training problem (problem_id, level,
  # num_samples, num_correct, num_kept) ...
  stats: dict[str, list[dict]]
  # ... and the kept samples (problem_id, prompt, sample, reward, iteration, seed).
  kept: dict[str, list[dict]]


def load_run(workdir: str) -> RunFiles:
  """Reads the evaluations and E-step samples of `workdir` (a local path or gs:// URL).

  Reads the per-phase files, not summary.json (written only at the very end), so
  a run still going can be inspected. An E-step chunk counts once its stats file
  exists (it is written after the chunk's shard); a shard without one belongs to a
  chunk that was cut off and will be redone, so it is skipped.
  """
  if not wd.exists(workdir):
    raise FileNotFoundError(f"workdir {workdir!r} does not exist")
  config_path = os.path.join(workdir, "config.json")
  config = (ml_collections.ConfigDict(wd.read_json(config_path))
            if wd.exists(config_path) else None)
  evals = [wd.read_json(p) for p in wd.glob(workdir, "*/eval.json")]
  evals.sort(key=lambda r: (r["iteration"] == "sft", r["iteration"]))
  stats, kept = {}, {}
  for samples_dir in wd.glob(workdir, "iter_*/samples"):
    name = os.path.basename(os.path.dirname(samples_dir))
    stats[name], kept[name] = [], []
    for stats_path in wd.glob(samples_dir, "stats_*.jsonl"):
      stats[name] += wd.read_lines(stats_path)
      shard = os.path.join(samples_dir, os.path.basename(stats_path).replace("stats_", "shard_"))
      kept[name] += wd.read_lines(shard) if wd.exists(shard) else []
  return RunFiles(config=config, evals=evals, stats=stats, kept=kept)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{100 * v:.1f}"
  return "-" if v is None else str(v)


def _label(iteration: str) -> str:
  return "0 (base)" if iteration == "000" else iteration


def summary_table(results: Sequence[dict], eval_cfg: ml_collections.ConfigDict,
                  label: Callable[[str], str] = _label) -> str:
  """Markdown table: one row per model (base = iteration 000, sft = the baseline).

  label: the first column's text for an iteration ("000" -> "0 (base)", others as is).
  """
  n = eval_cfg.num_samples
  ks = [k for k in eval_cfg.pass_k if k <= n and k > 1]
  cols = [("iteration", "iteration"), ("pass@1 test", "pass@1_greedy_test")]
  if any("distinct_answers_test" in r for r in results):
    cols.append(("distinct answers (test)", "distinct_answers_test"))
  cols.append(("pass@1 train", "pass@1_greedy_train"))
  cols += [(f"pass@{k}", f"pass@{k}") for k in ks]
  if eval_cfg.majority_k <= n:
    cols.append((f"maj@{eval_cfg.majority_k}", f"maj@{eval_cfg.majority_k}"))
  cols.append(("samples kept", "samples_kept"))
  # Transfer tasks (never trained on) and answer diversity, where the run has them.
  keys = {k for r in results for k in r if k.startswith("transfer/")}
  for name in sorted({k.split("/")[1] for k in keys}):
    cols.append((f"{name} (transfer)", f"transfer/{name}/pass@1_greedy"))
    if f"transfer/{name}/distinct_answers" in keys:
      cols.append((f"{name} distinct answers", f"transfer/{name}/distinct_answers"))
    # eval.transfer_sampled: the sampled columns the main split has, for this task.
    cols += [(f"{name} {m}", f"transfer/{name}/{m}")
             for m in [f"pass@{k}" for k in ks] + [f"maj@{eval_cfg.majority_k}"]
             if f"transfer/{name}/{m}" in keys]
  lines = ["| " + " | ".join(c for c, _ in cols) + " |",
           "|" + "---|" * len(cols)]
  for r in results:
    row = dict(r)
    if "iteration" in row:
      row["iteration"] = label(row["iteration"])
    lines.append("| " + " | ".join(_fmt(row.get(k)) for _, k in cols) + " |")
  return "\n".join(lines)


def pass_at_1_figure(results: Sequence[dict]) -> Any:
  """pass@1 (greedy) per iteration for test and train, SFT as a reference line (Fig. 2).

  A matplotlib Figure made without pyplot: no global backend change, so the
  caller may save it (plot_pass_at_1) or show it (a notebook's display()).
  """
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  iters = [r for r in results if r.get("iteration") != "sft"]
  xs = [int(r["iteration"]) for r in iters]
  fig = Figure(figsize=(5, 3.5), dpi=120)
  ax = fig.subplots()
  ax.plot(xs, [100 * r["pass@1_greedy_test"] for r in iters], "o-", label="ReST-EM (test)")
  if all("pass@1_greedy_train" in r for r in iters):
    ax.plot(xs, [100 * r["pass@1_greedy_train"] for r in iters], "s--", alpha=0.7,
            label="ReST-EM (train)")
  for key in sorted({k for r in iters for k in r if k.endswith("/pass@1_greedy")}):
    if all(key in r for r in iters):
      ax.plot(xs, [100 * r[key] for r in iters], "^:", alpha=0.8,
              label=f"{key.split('/')[1]} (transfer)")
  for r in results:
    if r.get("iteration") == "sft":
      ax.axhline(100 * r["pass@1_greedy_test"], color="gray", ls=":",
                 label="SFT on human data (test)")
  ax.set_xlabel("iteration (0 = base model)")
  ax.set_ylabel("greedy pass@1 (%)")
  ax.set_xticks(xs)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_pass_at_1(results: Sequence[dict], path: str) -> None:
  """pass_at_1_figure as a PNG file at `path` (local or gs://)."""
  buf = io.BytesIO()  # via bytes: savefig cannot write to gs:// itself
  pass_at_1_figure(results).savefig(buf, format="png")
  epath.Path(path).write_bytes(buf.getvalue())


def write_summary(workdir: str, results: Sequence[dict], eval_cfg: ml_collections.ConfigDict
                  ) -> str:
  table = summary_table(results, eval_cfg)
  wd.write_json_atomic(os.path.join(workdir, "summary.json"), list(results))
  command = export.command_for(workdir)  # The best iteration, for other runtimes.
  wd.write_text_atomic(os.path.join(workdir, "summary.txt"),
                       table + "\n" + (f"\nexport: {command}\n" if command else ""))
  plot_pass_at_1(results, os.path.join(workdir, "pass_at_1.png"))
  print(table, flush=True)
  return table


def write_tensorboard(workdir: str, name: str, result: dict) -> None:
  """Scalars of one evaluation at step = iteration; the SFT baseline under sft/."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (already loaded by seqio)
  prefix, step = ("sft", 0) if name == "sft" else ("eval", int(name))
  writer = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
  with writer.as_default():
    for k, v in result.items():
      if isinstance(v, float):
        tf.summary.scalar(f"{prefix}/{k}", v, step=step)
  writer.flush()
  writer.close()
