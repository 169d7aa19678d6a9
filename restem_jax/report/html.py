"""report.html: one self-contained page per run (inline CSS, JS and SVG; nothing fetched).

ReST-EM is debugged by reading samples, so beside the run's numbers (config,
command, phase times, per-iteration and per-level tables, pass@1 with 95%
intervals, transfer tasks) the page shows which test problems each model
gained or lost against the one before (with both answers), how many distinct
answers each model gives and which it repeats most (a one-answer "skill"
shows there), and browsers of the greedy test answers and of the E-step's kept
(and restem.keep_rejected) samples, filtered by level, reward and text in the
page's JavaScript. Large runs stay openable: at most MAX_ROWS rows per model or
iteration, MAX_CHANGES per gained/lost list and MAX_TEXT characters per text
are inlined (the page says what it cut and where the full records are).
"""
from __future__ import annotations

import collections
import datetime
import html
import json
import re
from typing import Any, Sequence

from restem_jax import metrics

MAX_ROWS = 1000  # rows per model (greedy answers) or per iteration (samples) in the browsers
MAX_TEXT = 1200  # characters of one completion, sample or question
MAX_CHANGES = 200  # problems listed per gained / lost list
TOP_ANSWERS = 10  # most repeated answers shown per model


def _e(x: Any) -> str:
  return html.escape("" if x is None else str(x))


def _cut(text: Any, limit: int = MAX_TEXT) -> str:
  s = "" if text is None else str(text)
  return s if len(s) <= limit else s[:limit] + f" [... {len(s) - limit} more characters]"


def model_label(iteration: str) -> str:
  return {"000": "0 (base)", "sft": "SFT"}.get(iteration, str(int(iteration))
                                               if iteration.isdigit() else iteration)


def test_records(run: Any) -> dict[str, list[dict]]:
  """Model ("000", "001", ..., "sft") -> its test-split records, in eval order."""
  return {r["iteration"]: [p for p in run.problems.get(r["iteration"], [])
                           if p.get("split") == "test"] for r in run.evals}


def model_pairs(iterations: Sequence[str]) -> list[tuple[str, str]]:
  """The comparisons of "what changed": each iteration against the one before, and the
  SFT baseline against the base."""
  its = [i for i in iterations if i != "sft"]
  pairs = list(zip(its, its[1:]))
  if "sft" in iterations and "000" in iterations:
    pairs.append(("000", "sft"))
  return pairs


def changes(before: Sequence[dict], after: Sequence[dict]) -> tuple[list[tuple], list[tuple]]:
  """(gained, lost): test problems solved (reward > 0) by `after` but not `before`, and the
  reverse, as (before's record, after's record) pairs, by problem id."""
  prev = {r["problem_id"]: r for r in before}
  gained, lost = [], []
  for r in after:
    b = prev.get(r["problem_id"])
    if b is None:
      continue
    if r["reward"] > 0 and not b["reward"] > 0:
      gained.append((b, r))
    elif b["reward"] > 0 and not r["reward"] > 0:
      lost.append((b, r))
  return gained, lost


def answer_counts(records: Sequence[dict]) -> collections.Counter:
  """How often each extracted greedy answer occurs (None: no answer found)."""
  return collections.Counter(r.get("answer") for r in records)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "",
           row_cls: str = "", raw: bool = False) -> str:
  """An HTML table; cells are escaped unless raw (already HTML)."""
  cell = (lambda c: c) if raw else _e
  head = "".join(f"<th>{_e(h)}</th>" for h in headers)
  body = "".join(f'<tr class="{row_cls}">' + "".join(f"<td>{cell(c)}</td>" for c in row)
                 + "</tr>" for row in rows)
  return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _pct_ci(rate: float | None, n: int | None) -> str:
  if rate is None:
    return "-"
  if not n:
    return f"{100 * rate:.1f}"
  lo, hi = metrics.wilson_interval(int(round(rate * n)), int(n))
  return f"{100 * rate:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _run_section(run: Any) -> str:
  parts = []
  if run.launches:
    parts.append("<h3>Starts (command, code version)</h3>" + _table(
        ["time (UTC)", "command", "code version", "host"],
        [[x.get("time"), x.get("command"), x.get("code_version"), x.get("host")]
         for x in run.launches], cls="launches"))
  else:
    parts.append("<p>No launches.jsonl: this run was started before starts were recorded.</p>")
  seconds = run.progress.get("seconds", {}) if isinstance(run.progress, dict) else {}
  done = run.progress.get("done", []) if isinstance(run.progress, dict) else []
  if done:
    rows = [[d, f"{seconds[d]:.1f}" if d in seconds else "-"] for d in done]
    rows.append(["total", f"{sum(seconds.get(d, 0.0) for d in done):.1f}"])
    parts.append("<h3>Phases (wall seconds of the run that computed each)</h3>"
                 + _table(["phase", "seconds"], rows, cls="phases"))
  if run.config is not None:
    cfg = json.dumps(run.config.to_dict(), indent=1, sort_keys=True, default=str)
    parts.append(f"<details><summary>config.json</summary><pre>{_e(cfg)}</pre></details>")
  return "\n".join(parts)


def _models_section(run: Any, table: tuple[list[str], list[list[str]]]) -> str:
  headers, rows = table
  ci = [_pct_ci(r.get("pass@1_greedy_test"), r.get("num_test")) for r in run.evals]
  headers = headers[:2] + ["pass@1 test, 95% CI"] + headers[2:]
  rows = [row[:2] + [c] + row[2:] for row, c in zip(rows, ci)]
  return _table(headers, rows, cls="models", row_cls="model-row")


def _levels_section(run: Any) -> str:
  levels = sorted({lvl for r in run.evals for lvl in r.get("pass@1_greedy_test_by_level", {})})
  if not levels:
    return "<p>No per-level results.</p>"
  counts = collections.Counter(p["level"] for p in next(iter(test_records(run).values()), []))
  headers = ["level", "test problems"] + [model_label(r["iteration"]) for r in run.evals]
  rows = [[lvl, str(counts.get(lvl, "-"))]
          + [_pct_ci(r.get("pass@1_greedy_test_by_level", {}).get(lvl), counts.get(lvl))
             for r in run.evals] for lvl in levels]
  return _table(headers, rows, cls="levels")


def _transfer_section(run: Any) -> str:
  labels = sorted({k.split("/")[1] for r in run.evals for k in r if k.startswith("transfer/")})
  if not labels:
    return "<p>No transfer tasks (eval.transfer_tasks).</p>"
  headers = ["model"] + [f"{t} pass@1, 95% CI" for t in labels]
  rows = [[model_label(r["iteration"])]
          + [_pct_ci(r.get(f"transfer/{t}/pass@1_greedy"), r.get(f"transfer/{t}/num_test"))
             for t in labels] for r in run.evals]
  return _table(headers, rows, cls="transfer")


def _change_item(b: dict, a: dict) -> str:
  return (f'<li><b>{_e(a["problem_id"])}</b> <span class="lvl">{_e(a.get("level"))}</span> '
          f'<span class="ans">{_e(b.get("answer"))} &rarr; {_e(a.get("answer"))}</span> '
          f'<span class="gold">(gold {_e(_cut(a.get("gold"), 80))})</span>'
          f'<div class="q">{_e(_cut(a.get("question"), 300))}</div></li>')


def _changes_section(run: Any) -> str:
  recs = test_records(run)
  out = []
  for x, y in model_pairs([r["iteration"] for r in run.evals]):
    if not recs.get(x) or not recs.get(y):
      continue
    gained, lost = changes(recs[x], recs[y])
    title = f"{model_label(x)} &rarr; {model_label(y)}"
    lists = []
    for kind, items in (("gained", gained), ("lost", lost)):
      cut = (f' <span class="note">(first {MAX_CHANGES} listed)</span>'
             if len(items) > MAX_CHANGES else "")
      lists.append(f'<div><h4>{kind}: <span class="n-{kind}">{len(items)}</span>{cut}</h4>'
                   f'<ul class="{kind}">'
                   + "".join(_change_item(b, a) for b, a in items[:MAX_CHANGES]) + "</ul></div>")
    out.append(f'<section class="change" id="change-{_e(x)}-{_e(y)}" data-from="{_e(x)}" '
               f'data-to="{_e(y)}" data-gained="{len(gained)}" data-lost="{len(lost)}">'
               f'<h3>{title}: +{len(gained)} / &minus;{len(lost)} test problems</h3>'
               f'<div class="cols">{"".join(lists)}</div></section>')
  return "\n".join(out) or "<p>No two models with per-problem records to compare.</p>"


def _answers_section(run: Any) -> str:
  rows = []
  for it, recs in test_records(run).items():
    if not recs:
      continue
    counts = answer_counts(recs)
    distinct = len(set(counts) - {None})
    top = [(a, c) for a, c in counts.most_common() if a is not None][:TOP_ANSWERS]
    correct = {r.get("answer") for r in recs if r["reward"] > 0}
    share = 100 * top[0][1] / len(recs) if top else 0.0
    warn = " warn" if share >= 50 else ""
    cells = ", ".join(f'<span class="{"ok" if a in correct else ""}">{_e(_cut(a, 40))}'
                      f" &times;{c}</span>" for a, c in top) or "-"
    rows.append([_e(model_label(it)), f'<span class="distinct">{distinct}</span>',
                 str(counts.get(None, 0)), f'<span class="{warn}">{share:.0f}%</span>', cells])
  if not rows:
    return "<p>No per-problem records.</p>"
  return _table(["model", "distinct answers", "no answer", "most repeated answer's share",
                 f"most repeated answers (up to {TOP_ANSWERS}; green: graded correct)"],
                rows, cls="answers", raw=True)


def _sampled_summary(groups: Sequence[dict] | None) -> str:
  if not groups:
    return ""
  times, check = "\u00d7", "\u2713"
  return ", ".join(f"{g['answer']}{times}{g['count']}{check if g['reward'] > 0 else ''}"
                   for g in groups[:8]) + (" ..." if len(groups) > 8 else "")


def _browser_data(run: Any) -> tuple[dict, list[str]]:
  """The rows the JavaScript browsers filter, capped; and notes on what was cut."""
  notes = []
  greedy = {}
  for it, recs in test_records(run).items():
    if not recs:
      continue
    if len(recs) > MAX_ROWS:
      notes.append(f"greedy answers of model {model_label(it)}: first {MAX_ROWS} of "
                   f"{len(recs)} test problems inlined")
    greedy[model_label(it)] = [
        {"id": r["problem_id"], "level": str(r.get("level", "")),
         "question": _cut(r.get("question")), "answer": r.get("answer"),
         "reward": r["reward"], "text": _cut(r.get("greedy")),
         "sampled": _sampled_summary(r.get("sampled"))} for r in recs[:MAX_ROWS]]
  samples = {}
  for name in sorted(run.kept):
    level = {s["problem_id"]: str(s.get("level", "")) for s in run.stats.get(name, [])}
    rows = ([("kept", r) for r in run.kept[name]]
            + [("rejected", r) for r in run.rejected.get(name, [])])
    if len(rows) > MAX_ROWS:
      notes.append(f"samples of {name}: first {MAX_ROWS} of {len(rows)} inlined")
    samples[name] = [
        {"id": r["problem_id"], "level": level.get(r["problem_id"], ""), "kind": kind,
         "reward": r["reward"], "index": r.get("sample_index", -1), "text": _cut(r["sample"]),
         "model": r.get("model", ""),
         "key": (f"{r['rng_key']} / {r.get('problem_index')} / {r.get('sample_index')}"
                 if r.get("rng_key") else "")} for kind, r in rows[:MAX_ROWS]]
  return {"greedy": greedy, "samples": samples}, notes


def _browser(bid: str, title: str, sets: dict) -> str:
  opts = "".join(f'<option value="{_e(k)}">{_e(k)}</option>' for k in sets)
  return (f'<div class="browser" id="{bid}"><h3>{_e(title)}</h3><div class="filters">'
          f'<label>set <select class="set">{opts}</select></label> '
          '<label>level <select class="level"><option value="">all</option></select></label> '
          '<label>reward <select class="reward"><option value="">all</option>'
          '<option value="pos">reward &gt; 0</option><option value="zero">reward = 0</option>'
          '</select></label> <label>search <input type="search" class="q" '
          'placeholder="id, question, answer or text"></label> '
          '<span class="count" data-count="0"></span> '
          '<button class="prev">&lsaquo; prev</button> <span class="page"></span> '
          '<button class="next">next &rsaquo;</button></div>'
          '<table class="rows"><thead></thead><tbody></tbody></table></div>')


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1300px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 7px;
vertical-align:top;text-align:left}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
pre,.text{white-space:pre-wrap;font:12px/1.35 ui-monospace,monospace;margin:0}
.note,.gold,.lvl{color:#777}.ans{font-family:monospace;background:#eef;padding:0 4px}
.q{color:#555;font-size:12px;max-height:4.2em;overflow:hidden}.cols{display:flex;gap:2em}
.cols>div{flex:1;min-width:0}ul.gained li{border-left:3px solid #2a2;padding-left:6px;margin:4px 0}
ul.lost li{border-left:3px solid #c33;padding-left:6px;margin:4px 0}ul{list-style:none;padding:0}
.ok{color:#180}.warn{color:#c30;font-weight:bold}.filters{margin:.4em 0}.count{margin:0 1em}
table.rows td.text{max-width:700px}.pos{color:#180}.zero{color:#c33}svg{max-width:100%;height:auto}
"""

# The browsers: filter the inlined rows by set (model / iteration), level, reward and a
# text search, and show them a page at a time (rows are built only for the page shown).
_JS = r"""
const DATA = JSON.parse(document.getElementById('report-data').textContent);
const PAGE = 25;
const COLUMNS = {
  greedy: [['id','problem'],['level','level'],['question','question'],['answer','answer'],
           ['reward','reward'],['text','greedy completion'],['sampled','sampled answers']],
  samples: [['id','problem'],['level','level'],['kind','kind'],['index','sample'],
            ['reward','reward'],['text','sample'],['model','sampled by'],
            ['key','key / problem index / sample index']]};
function setup(id, kind) {
  const root = document.getElementById(id), sets = DATA[kind];
  if (!root) return;
  const $ = s => root.querySelector(s);
  const state = {page: 0};
  $('thead').innerHTML = '<tr>' + COLUMNS[kind].map(c => '<th>' + c[1] + '</th>').join('') + '</tr>';
  function levels() {
    const rows = sets[$('.set').value] || [], sel = $('.level'), keep = sel.value;
    const lv = [...new Set(rows.map(r => r.level))].sort();
    sel.innerHTML = '<option value="">all</option>' +
      lv.map(l => '<option></option>').join('');
    lv.forEach((l, i) => { sel.options[i + 1].value = l; sel.options[i + 1].textContent = l; });
    sel.value = lv.includes(keep) ? keep : '';
  }
  function matches() {
    const rows = sets[$('.set').value] || [], lvl = $('.level').value, rw = $('.reward').value;
    const q = $('.q').value.trim().toLowerCase();
    return rows.filter(r => (!lvl || r.level === lvl) &&
      (!rw || (rw === 'pos' ? r.reward > 0 : !(r.reward > 0))) &&
      (!q || [r.id, r.question, r.answer, r.text].some(
          v => v != null && String(v).toLowerCase().includes(q))));
  }
  function draw() {
    const rows = matches(), pages = Math.max(1, Math.ceil(rows.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    const body = $('tbody');
    body.textContent = '';
    for (const r of rows.slice(state.page * PAGE, (state.page + 1) * PAGE)) {
      const tr = document.createElement('tr');
      tr.className = 'row';
      for (const [k] of COLUMNS[kind]) {
        const td = document.createElement('td');
        td.textContent = r[k] == null ? '-' : String(r[k]);
        if (k === 'text' || k === 'question') td.className = 'text';
        if (k === 'reward') td.className = r.reward > 0 ? 'pos' : 'zero';
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    const total = (sets[$('.set').value] || []).length;
    $('.count').textContent = rows.length + ' of ' + total + ' rows match';
    $('.count').dataset.count = rows.length;
    $('.page').textContent = 'page ' + (state.page + 1) + ' / ' + pages;
  }
  const reset = () => { state.page = 0; draw(); };
  $('.set').addEventListener('change', () => { levels(); reset(); });
  for (const s of ['.level', '.reward']) $(s).addEventListener('change', reset);
  $('.q').addEventListener('input', reset);
  $('.prev').addEventListener('click', () => { state.page = Math.max(0, state.page - 1); draw(); });
  $('.next').addEventListener('click', () => { state.page += 1; draw(); });
  levels();
  draw();
}
setup('greedy-browser', 'greedy');
setup('samples-browser', 'samples');
"""


def render(run: Any, *, workdir: str, plot_svg: str,
           table: tuple[list[str], list[list[str]]]) -> str:
  """The page for `run` (report.load_run); plot_svg: the pass@1 figure as SVG text;
  table: report.summary_rows (headers, cells) of run.evals."""
  data, notes = _browser_data(run)
  blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
  svg = plot_svg[plot_svg.find("<svg"):] if "<svg" in plot_svg else ""
  svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)  # RDF identifiers: unused
  cut = ("".join(f"<li>{_e(n)}</li>" for n in notes) or "<li>nothing: every record is inlined"
         "</li>")
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ReST-EM run {_e(workdir)}</title>
<style>{_CSS}</style></head><body>
<h1>ReST-EM run: {_e(workdir)}</h1>
<p class="note">Written {now} by <code>python -m restem_jax.report {_e(workdir)}</code>.
This page: __PAGE_SIZE__, self-contained (nothing is fetched). Inlined at most
{MAX_ROWS} rows per model or iteration, {MAX_CHANGES} problems per gained/lost list and
{MAX_TEXT} characters per text; cut here:</p><ul class="cuts">{cut}</ul>
<p class="note">Full records: <code>*/eval_problems.jsonl</code> (every evaluated problem),
<code>iter_*/samples/</code> (kept and rejected samples with provenance);
read them with <code>restem_jax.report.load_run</code>.</p>
<h2>Run</h2>{_run_section(run)}
<h2>Models</h2>{_models_section(run, table)}
<p class="note">Percentages; brackets: 95% Wilson interval over the test problems.</p>
<div class="plot">{svg}</div>
<h2>By level (greedy pass@1 on test, 95% CI)</h2>{_levels_section(run)}
<h2>Transfer tasks</h2>{_transfer_section(run)}
<h2>What changed between models (test problems)</h2>{_changes_section(run)}
<h2>Answers</h2>
<p class="note">Distinct extracted greedy answers on the test split and the most repeated
ones: a model that scores by giving one answer to everything shows a large share here.</p>
{_answers_section(run)}
<h2>Browse</h2>
{_browser("greedy-browser", "Greedy test answers", data["greedy"])}
{_browser("samples-browser", "E-step samples (kept; rejected with restem.keep_rejected)",
          data["samples"])}
<script type="application/json" id="report-data">{blob}</script>
<script>{_JS}</script>
</body></html>
"""
  size = len(page.encode())
  return page.replace("__PAGE_SIZE__", f"{size / 1e6:.2f} MB" if size >= 1e5 else
                      f"{size / 1e3:.0f} kB")
