"""Writes train.jsonl / test.jsonl of the countdown example (docs/YOUR_TASK.md).

    python examples/countdown/make_data.py

A row: two or three numbers from 1-9 and a target made from them with + - *; the
model writes an expression that makes the target (any correct one counts: reward.py).
Every other train row carries a worked solution (the human data); the rest only
the question. The same seed always writes the same files.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))


def row(rng: random.Random) -> dict:
  while True:
    numbers = [rng.randint(1, 9) for _ in range(rng.choice((2, 2, 3)))]
    expr = str(numbers[0])
    for n in numbers[1:]:
      expr += f" {rng.choice('+-*')} {n}"
    target = eval(expr)  # pylint: disable=eval-used
    if 0 <= target <= 60:
      return {"question": f"Make {target} from {' and '.join(map(str, numbers))}.",
              "numbers": numbers, "target": target, "answer": expr,
              "level": f"numbers={len(numbers)}"}


def main() -> None:
  rng = random.Random(0)
  rows, seen = [], set()
  while len(rows) < 1100:
    r = row(rng)
    if r["question"] not in seen:  # Test questions never occur in train.
      seen.add(r["question"])
      rows.append(r)
  test, train = rows[:100], rows[100:]
  for r in train[::2]:
    r["solution"] = f"{r['answer']} = {r['target']}"
  for name, part in (("train", train), ("test", test)):
    with open(os.path.join(HERE, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in part)


if __name__ == "__main__":
  main()
