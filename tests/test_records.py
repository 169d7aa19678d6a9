"""Per-problem records and the E-step's rejected samples, on hand-made inputs (fast).

The end-to-end checks (records of a real run agree with its eval.json, provenance
reproduces a kept sample, the report in a browser) are in tests/test_report_html.py.
"""
import collections
import json
import os

from restem_jax import evaluate, generate, samples
from restem_jax.report import html as report_html
from restem_jax.tasks import Problem


class _Task:
  """A task whose answer key is the last word of the postprocessed text (None if empty)."""
  answer_key = staticmethod(lambda t: t.split()[-1] if t.split() else None)

  @staticmethod
  def postprocess(t):
    return t.split("\n")[0]


def _problem(i, level="1"):
  return Problem(id=f"p{i}", question=f"question {i}", prompt=f"Q{i}:", target="", gold=str(i),
                 level=level)


def test_problem_records_and_grouped_samples():
  task = _Task()
  probs = [_problem(0), _problem(1, "2")]
  recs = evaluate.problem_records(task, probs, ["so 7\nnoise", ""], [1.0, 0.0], "test")
  assert recs == [
      {"split": "test", "problem_id": "p0", "level": "1", "question": "question 0", "gold": "0",
       "greedy": "so 7\nnoise", "answer": "7", "reward": 1.0},
      {"split": "test", "problem_id": "p1", "level": "2", "question": "question 1", "gold": "1",
       "greedy": "", "answer": None, "reward": 0.0}]
  answers = ["3", "4", "3", None, "3", "4"]
  rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
  groups = evaluate.grouped_samples(answers, rewards)
  # Hand count: "3" three times (correct), "4" twice, no answer once; most frequent first.
  assert groups == [{"answer": "3", "reward": 1.0, "count": 3},
                    {"answer": "4", "reward": 0.0, "count": 2},
                    {"answer": None, "reward": 0.0, "count": 1}]
  assert sum(g["count"] for g in groups) == len(answers)
  assert evaluate.distinct_answers(task, ["a 3", "b 3", "c 4", ""]) == 2


def test_rejected_samples_are_stored_apart_and_never_read_as_training_data(tmp_path):
  d = str(tmp_path)
  prov = dict(problem_index=4, model="/ckpt/iter_000", rng_key=[0, 7],
              sampling={"temperature": 1.0, "top_k": 0, "top_p": 1.0})
  kept = [samples.KeptSample(problem_id="p", prompt="Q", sample="good", reward=1.0,
                             iteration=1, seed=0, sample_index=2, **prov)]
  rejected = [samples.KeptSample(problem_id="p", prompt="Q", sample=f"bad{k}", reward=0.0,
                                 iteration=1, seed=0, sample_index=k, **prov) for k in (0, 1)]
  stats = [samples.ProblemStats(problem_id="p", level="1", num_samples=4, num_correct=1,
                                num_kept=1)]
  samples.write_chunk(d, 0, 0, kept, stats, rejected)
  assert sorted(os.listdir(d)) == ["rejected_00000_p000.jsonl", "shard_00000_p000.jsonl",
                                   "stats_00000_p000.jsonl"]
  assert samples.read_samples(d) == kept  # The M-step's input: the kept sample alone.
  assert samples.read_rejected(d) == rejected
  assert samples.verify(d, 1)["kept"] == 1  # rejected_ files do not disturb the counts
  # A chunk cut off before its stats file: its rejected_ file is removed with the rest.
  samples.write_chunk(d, 1, 0, kept, [], rejected)
  os.remove(os.path.join(d, "stats_00001_p000.jsonl"))
  assert generate._chunks_to_do(d, [range(0, 1), range(1, 2)]) == [1]
  assert not os.path.exists(os.path.join(d, "rejected_00001_p000.jsonl"))


def _records(rewards, answers, split="test"):
  return [{"split": split, "problem_id": f"p{i}", "level": str(i % 2), "question": f"q{i}",
           "gold": "g", "greedy": f"text {a}", "answer": a, "reward": r}
          for i, (r, a) in enumerate(zip(rewards, answers))]


class _Run:
  """What report.load_run returns, for three models of a 6-problem test split."""

  def __init__(self):
    self.config = None
    self.problems = {"000": _records([1, 0, 0, 1, 0, 0], ["1", "2", "2", "4", None, "2"]),
                     "001": _records([1, 1, 0, 0, 1, 0], ["1", "1", "2", "3", "1", "1"]),
                     "sft": _records([0, 0, 0, 1, 1, 1], ["0", "0", "0", "4", "5", "6"])}
    self.evals = [{"iteration": it, "num_test": 6, "pass@1_greedy_test":
                   sum(r["reward"] for r in recs) / 6} for it, recs in self.problems.items()]
    self.kept, self.rejected, self.stats = {}, {}, {}
    self.progress, self.launches = {"done": ["base"], "seconds": {"base": 1.5}}, []


def test_changes_and_answer_counts_by_hand():
  run = _Run()
  recs = report_html.test_records(run)
  assert report_html.model_pairs(["000", "001", "sft"]) == [("000", "001"), ("000", "sft")]
  gained, lost = report_html.changes(recs["000"], recs["001"])
  # By hand: 000 solved p0, p3; 001 solved p0, p1, p4.
  assert [a["problem_id"] for _, a in gained] == ["p1", "p4"]
  assert [b["problem_id"] for b, _ in lost] == ["p3"]
  assert report_html.answer_counts(recs["001"]) == collections.Counter(
      {"1": 4, "2": 1, "3": 1})
  page = report_html.render(run, workdir="/w", plot_svg="<?xml?><svg></svg>",
                            table=(["iteration", "pass@1 test"],
                                   [[r["iteration"], "x"] for r in run.evals]))
  assert 'id="change-000-001" data-from="000" data-to="001" data-gained="2" data-lost="1"' in page
  assert 'id="change-000-sft" data-from="000" data-to="sft" data-gained="2" data-lost="1"' in page
  assert page.count('class="model-row"') == 3
  # The data blob is valid JSON whatever the texts hold (a "</script>" included).
  run.problems["000"][0]["greedy"] = "</script><b>x"
  page = report_html.render(run, workdir="/w", plot_svg="", table=([], [[], [], []]))
  start = page.index('id="report-data">') + len('id="report-data">')
  blob = json.loads(page[start:page.index("</script>", start)])
  assert blob["greedy"]["0 (base)"][0]["text"] == "</script><b>x"
  assert "<b>x" not in page.replace("<\\/script><b>x", "")
