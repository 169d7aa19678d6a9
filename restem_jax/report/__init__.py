"""Run outputs for people: the summary table, the pass@1 plot, TensorBoard, report.html
(report/html.py), and `load_run`, which reads a workdir back (colab/inspect_run.ipynb and
the HTML report are built on it).

    python -m restem_jax.report WORKDIR     writes WORKDIR/report.html (also written at
                                            the end of every run)
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Callable, Sequence

import ml_collections
from etils import epath

from restem_jax import export, metrics, runinfo, workdir as wd


@dataclasses.dataclass(frozen=True)
class RunFiles:
  """What a workdir holds so far, finished or not, as plain Python values (workdir.py: layout)."""
  config: ml_collections.ConfigDict | None  # config.json (None before the run wrote it)
  # One eval.json per evaluated model, iteration "000" (base), "001", ..., "sft" last.
  evals: list[dict]
  # Per E-step ("iter_001", ...): one row per training problem (problem_id, level,
  # num_samples, num_correct, num_kept) ...
  stats: dict[str, list[dict]]
  # ... and the kept samples (problem_id, prompt, sample, reward, iteration, seed, and
  # their provenance: samples.KeptSample).
  kept: dict[str, list[dict]]
  # Per evaluated model (its eval.json "iteration"): eval_problems.jsonl, one record per
  # problem (evaluate.problem_records); models evaluated before the records existed: none.
  problems: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
  # Per E-step: the failed samples restem.keep_rejected stored (never trained on).
  rejected: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
  # progress.json ({"done": [...], "seconds": {phase: wall seconds}}) and launches.jsonl
  # (each start's command and code version, runinfo.py).
  progress: dict = dataclasses.field(default_factory=dict)
  launches: list[dict] = dataclasses.field(default_factory=list)


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
  evals, problems = [], {}
  for path in wd.glob(workdir, "*/eval.json"):
    evals.append(wd.read_json(path))
    # eval.json is written after its records: with it, they are complete.
    records = os.path.join(os.path.dirname(path), "eval_problems.jsonl")
    if wd.exists(records):
      problems[evals[-1]["iteration"]] = wd.read_lines(records)
  evals.sort(key=lambda r: (r["iteration"] == "sft", r["iteration"]))
  stats, kept, rejected = {}, {}, {}
  for samples_dir in wd.glob(workdir, "iter_*/samples"):
    name = os.path.basename(os.path.dirname(samples_dir))
    stats[name], kept[name], rejected[name] = [], [], []
    for stats_path in wd.glob(samples_dir, "stats_*.jsonl"):
      stats[name] += wd.read_lines(stats_path)
      for kind, rows in (("shard_", kept[name]), ("rejected_", rejected[name])):
        path = os.path.join(samples_dir, os.path.basename(stats_path).replace("stats_", kind))
        rows += wd.read_lines(path) if wd.exists(path) else []
  progress_path = os.path.join(workdir, "progress.json")
  progress = wd.read_json(progress_path) if wd.exists(progress_path) else {}
  return RunFiles(config=config, evals=evals, stats=stats, kept=kept, problems=problems,
                  rejected=rejected, progress=progress,
                  launches=runinfo.read_launches(workdir))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{100 * v:.1f}"
  return "-" if v is None else str(v)


def _label(iteration: str) -> str:
  return "0 (base)" if iteration == "000" else iteration


def _summary_columns(results: Sequence[dict], eval_cfg: ml_collections.ConfigDict
                     ) -> list[tuple[str, str]]:
  """(header, eval.json key) of each column of the summary table."""
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
  return cols


def summary_table(results: Sequence[dict], eval_cfg: ml_collections.ConfigDict,
                  label: Callable[[str], str] = _label) -> str:
  """Markdown table: one row per model (base = iteration 000, sft = the baseline).

  label: the first column's text for an iteration ("000" -> "0 (base)", others as is).
  """
  headers, rows = summary_rows(results, eval_cfg, label)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def summary_rows(results: Sequence[dict], config_or_eval_cfg: Any,
                 label: Callable[[str], str] = _label) -> tuple[list[str], list[list[str]]]:
  """summary_table's headers and cells (report.html renders them as HTML). Takes the
  run's config or its eval block; without either (a run that has not saved its config),
  the default config's."""
  cfg = config_or_eval_cfg
  if cfg is None:
    from restem_jax import configlib  # pylint: disable=import-outside-toplevel
    cfg = configlib.default_config()
  cols = _summary_columns(results, cfg.eval if "eval" in cfg else cfg)
  rows = []
  for r in results:
    row = dict(r)
    if "iteration" in row:
      row["iteration"] = label(row["iteration"])
    rows.append([_fmt(row.get(k)) for _, k in cols])
  return [c for c, _ in cols], rows


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

  def line(key: str, n_key: str, fmt: str, label: str, **kw: Any) -> None:
    """pass@1 per iteration, with its 95% Wilson interval where the count is known."""
    ys = [100 * r[key] for r in iters]
    err = [interval_pct(r[key], r.get(n_key)) for r in iters]
    if all(e is not None for e in err):
      # (max: at a rate of 0 or 1 the interval's end differs from it by rounding only.)
      lo_hi = [[max(0.0, y - e[0]) for y, e in zip(ys, err)],
               [max(0.0, e[1] - y) for y, e in zip(ys, err)]]
      ax.errorbar(xs, ys, yerr=lo_hi, fmt=fmt, capsize=3, label=label + ", 95% CI", **kw)
    else:
      ax.plot(xs, ys, fmt, label=label, **kw)

  line("pass@1_greedy_test", "num_test", "o-", "ReST-EM (test)")
  if all("pass@1_greedy_train" in r for r in iters):
    line("pass@1_greedy_train", "num_train_eval", "s--", "ReST-EM (train)", alpha=0.7)
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


def interval_pct(rate: float, n: int | None) -> tuple[float, float] | None:
  """The 95% Wilson interval (in %) of a pass rate over n problems (None: n unknown)."""
  if not n:
    return None
  lo, hi = metrics.wilson_interval(int(round(rate * n)), int(n))
  return 100 * lo, 100 * hi


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
  wd.write_text_atomic(os.path.join(workdir, "summary.md"),
                       table + "\n" + (f"\nexport: {command}\n" if command else ""))
  plot_pass_at_1(results, os.path.join(workdir, "pass_at_1.png"))
  print(table, flush=True)
  return table


def write_html(workdir: str) -> str:
  """WORKDIR/report.html from what the workdir holds now; returns its path."""
  from restem_jax.report import html  # pylint: disable=import-outside-toplevel
  run = load_run(workdir)
  buf = io.StringIO()
  if run.evals:
    pass_at_1_figure(run.evals).savefig(buf, format="svg")
  path = os.path.join(workdir, "report.html")
  wd.write_text_atomic(path, html.render(run, workdir=workdir, plot_svg=buf.getvalue(),
                                         table=summary_rows(run.evals, run.config)))
  return path


# What TensorBoard's text tab shows per evaluation: this many greedy answers and kept samples.
TB_TEXT_ROWS = 5


def _md_cell(text: Any, limit: int = 300) -> str:
  s = str(text).replace("\n", " ").replace("|", "\\|")
  return s[:limit] + ("..." if len(s) > limit else "")


def tensorboard_texts(workdir: str, name: str, records: Sequence[dict] | None) -> dict[str, str]:
  """Markdown tables for TensorBoard's text tab: the first greedy test answers of model
  `name` and (iterations) a few samples its E-step kept."""
  out = {}
  test = [r for r in records or () if r.get("split") == "test"][:TB_TEXT_ROWS]
  if test:
    out["greedy_answers"] = "\n".join(
        ["| problem | level | answer | reward | completion |", "|---|---|---|---|---|"]
        + [f"| {_md_cell(r['problem_id'])} | {_md_cell(r['level'])} | {_md_cell(r['answer'])} "
           f"| {r['reward']:g} | {_md_cell(r['greedy'])} |" for r in test])
  samples_dir = os.path.join(workdir, f"iter_{name}", "samples")
  kept: list[dict] = []
  for shard in wd.glob(samples_dir, "shard_*.jsonl") if name.isdigit() else []:
    kept += wd.read_lines(shard)
    if len(kept) >= TB_TEXT_ROWS:
      break
  if kept:
    out["kept_samples"] = "\n".join(
        ["| problem | reward | sample |", "|---|---|---|"]
        + [f"| {_md_cell(r['problem_id'])} | {r['reward']:g} | {_md_cell(r['sample'])} |"
           for r in kept[:TB_TEXT_ROWS]])
  return out


def write_tensorboard(workdir: str, name: str, result: dict,
                      records: Sequence[dict] | None = None) -> None:
  """Scalars of one evaluation at step = iteration; the SFT baseline under sft/. With its
  problem records, also a few greedy answers and kept samples as text (tensorboard_texts)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  (already loaded by seqio)
  prefix, step = ("sft", 0) if name == "sft" else ("eval", int(name))
  writer = tf.summary.create_file_writer(os.path.join(workdir, "tb"))
  with writer.as_default():
    for k, v in result.items():
      if isinstance(v, float):
        tf.summary.scalar(f"{prefix}/{k}", v, step=step)
    for k, text in tensorboard_texts(workdir, name, records).items():
      tf.summary.text(f"{prefix}/{k}", text, step=step)
  writer.flush()
  writer.close()
