r"""report.html of a large run: page size, time to write it, time for Chromium to load it.

Writes a synthetic workdir shaped like a MATH run (10,000 test problems, base + 3
iterations + SFT, 30,000 kept samples per E-step, ~1,000-character completions),
then `report.write_html` on it, and loads the page in headless Chromium (Debian's
chromium + chromium-driver, `make browser`) if it is there.

    python benchmarks/report_page.py [--problems=10000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time

from restem_jax import report


def _text(rng: random.Random, words: int) -> str:
  return " ".join(rng.choice(["step", "so", "x", "=", "12", "+", "the", "answer", "is"])
                  for _ in range(words))


def make_workdir(root: str, problems: int, kept: int) -> None:
  rng = random.Random(0)
  for d, it in (("base_eval", "000"), ("iter_001", "001"), ("iter_002", "002"),
                ("iter_003", "003"), ("sft", "sft")):
    os.makedirs(os.path.join(root, d))
    rows = [{"split": "test", "problem_id": f"math/test/{i:05d}", "level": f"Level {i % 5 + 1}",
             "question": _text(rng, 60), "gold": "7", "greedy": _text(rng, 200),
             "answer": str(rng.randint(0, 50)), "reward": float(rng.random() < 0.3),
             "sampled": [{"answer": "3", "reward": 1.0, "count": 20},
                         {"answer": "4", "reward": 0.0, "count": 12}]} for i in range(problems)]
    with open(os.path.join(root, d, "eval_problems.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(root, d, "eval.json"), "w") as f:
      json.dump({"iteration": it, "num_test": problems, "pass@1_greedy_test":
                 sum(r["reward"] for r in rows) / problems}, f)
    if d.startswith("iter_"):
      s = os.path.join(root, d, "samples")
      os.makedirs(s)
      with open(os.path.join(s, "shard_00000_p000.jsonl"), "w") as f:
        f.writelines(json.dumps({"problem_id": f"math/train/{j // 4:05d}", "prompt": "Q",
                                 "sample": _text(rng, 200), "reward": 1.0, "iteration": 1,
                                 "seed": 0, "sample_index": j % 4}) + "\n" for j in range(kept))
      with open(os.path.join(s, "stats_00000_p000.jsonl"), "w") as f:
        f.writelines(json.dumps({"problem_id": f"math/train/{j:05d}", "level": "Level 1",
                                 "num_samples": 32, "num_correct": 4, "num_kept": 4}) + "\n"
                     for j in range(kept // 4))


def load_in_chromium(path: str) -> None:
  try:
    from selenium import webdriver  # pylint: disable=import-outside-toplevel
    from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("selenium missing: page not loaded in a browser")
    return
  if not (shutil.which("chromium") and shutil.which("chromedriver")):
    print("chromium / chromedriver missing (make browser): page not loaded in a browser")
    return
  opts = webdriver.ChromeOptions()
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu"):
    opts.add_argument(arg)
  opts.binary_location = shutil.which("chromium")
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
  try:
    start = time.time()
    driver.get("file://" + path)
    print(f"chromium load: {time.time() - start:.1f} s, console errors: "
          f"{[e for e in driver.get_log('browser') if e['level'] == 'SEVERE']}")
  finally:
    driver.quit()


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--problems", type=int, default=10_000)
  ap.add_argument("--kept", type=int, default=30_000)
  args = ap.parse_args()
  root = tempfile.mkdtemp(prefix="report_page_")
  try:
    make_workdir(root, args.problems, args.kept)
    records = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(root)
                  for f in fs)
    start = time.time()
    path = report.write_html(root)
    print(f"{args.problems} test problems x 5 models, {args.kept} kept samples x 3 E-steps: "
          f"records {records / 1e6:.1f} MB -> report.html {os.path.getsize(path) / 1e6:.1f} MB "
          f"in {time.time() - start:.1f} s")
    load_in_chromium(path)
  finally:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
