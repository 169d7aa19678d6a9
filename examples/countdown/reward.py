"""The countdown task's reward: fn(completion, row) -> 1.0 or 0.0 (docs/YOUR_TASK.md)."""
import re


def reward(completion: str, row: dict) -> float:
  """1.0 iff the completion's first line is +, -, * arithmetic using each of the row's
  numbers exactly once, and it equals the row's target."""
  expr = completion.strip().split("\n")[0].split("=")[0].strip()
  if not re.fullmatch(r"[\d+\-* ()]+", expr) or "**" in expr:
    return 0.0  # Not plain arithmetic (and no powers: 9**9**9 would never end).
  if sorted(int(n) for n in re.findall(r"\d+", expr)) != sorted(row["numbers"]):
    return 0.0
  try:
    return 1.0 if eval(expr, {"__builtins__": {}}) == row["target"] else 0.0  # pylint: disable=eval-used
  except SyntaxError:
    return 0.0
