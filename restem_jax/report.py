"""Run outputs for people: the summary table, the pass@1 plot, TensorBoard."""
from __future__ import annotations

import io
import os
from typing import Any, Sequence

import ml_collections
from etils import epath

from restem_jax import workdir as wd


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{100 * v:.1f}"
  return "-" if v is None else str(v)


def summary_table(results: Sequence[dict], eval_cfg: ml_collections.ConfigDict) -> str:
  """Markdown table: one row per model (base = iteration 000, sft = the baseline)."""
  n = eval_cfg.num_samples
  ks = [k for k in eval_cfg.pass_k if k <= n and k > 1]
  cols = [("iteration", "iteration"), ("pass@1 test", "pass@1_greedy_test"),
          ("pass@1 train", "pass@1_greedy_train")]
  cols += [(f"pass@{k}", f"pass@{k}") for k in ks]
  if eval_cfg.majority_k <= n:
    cols.append((f"maj@{eval_cfg.majority_k}", f"maj@{eval_cfg.majority_k}"))
  cols.append(("samples kept", "samples_kept"))
  # Transfer tasks (never trained on) and answer diversity, where the run has them.
  for key in sorted({k for r in results for k in r if k.startswith("transfer/")}):
    label, metric = key.split("/")[1:]
    if metric == "pass@1_greedy":
      cols.append((f"{label} (transfer)", key))
  lines = ["| " + " | ".join(c for c, _ in cols) + " |",
           "|" + "---|" * len(cols)]
  for r in results:
    row = dict(r)
    if row.get("iteration") == "000":
      row["iteration"] = "0 (base)"
    lines.append("| " + " | ".join(_fmt(row.get(k)) for _, k in cols) + " |")
  return "\n".join(lines)


def plot_pass_at_1(results: Sequence[dict], path: str) -> None:
  """pass@1 (greedy) per iteration for test and train, SFT as a reference line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  iters = [r for r in results if r.get("iteration") != "sft"]
  xs = [int(r["iteration"]) for r in iters]
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
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
  buf = io.BytesIO()  # via bytes: savefig cannot write to gs:// itself
  fig.savefig(buf, format="png")
  plt.close(fig)
  epath.Path(path).write_bytes(buf.getvalue())


def write_summary(workdir: str, results: Sequence[dict], eval_cfg: ml_collections.ConfigDict
                  ) -> str:
  table = summary_table(results, eval_cfg)
  wd.write_json_atomic(os.path.join(workdir, "summary.json"), list(results))
  wd.write_text_atomic(os.path.join(workdir, "summary.txt"), table + "\n")
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
