"""`python -m restem_jax.report WORKDIR`: writes WORKDIR/report.html (see report/html.py)."""
import sys

from restem_jax import report


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1].startswith("-"):
    print("usage: python -m restem_jax.report WORKDIR  (writes WORKDIR/report.html)",
          file=sys.stderr)
    return 2
  try:
    path = report.write_html(argv[1])
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
