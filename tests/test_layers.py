"""Layers without circles: restem_jax's internal imports form a graph with no cycle.

Every module under restem_jax/ is parsed with `ast` (nothing is imported); every
import statement counts, at module level or inside a function, except those under
`if TYPE_CHECKING:` (annotations only, never run). An edge goes to the module an
import names: `from restem_jax import x` to restem_jax.x when x is a submodule, else to
the package itself (its __init__); `import a.b.c` to a.b.c. Initialising a parent
package on the way is Python's business and no edge. Then the layering the design
asks for ("the edges", /work/shared/DESIGN.md):
  configlib  imports only errors (the schema and value checks sit at the bottom);
  preflight  checks data and files above tasks/ and workdir;
  workdir    does not import configlib (its caller passes the defaults in);
  rewards/   imports nothing from tasks/ (a task hands its grader what it needs).
"""
from __future__ import annotations

import ast
import os

import restem_jax

PACKAGE_DIR = os.path.dirname(os.path.abspath(restem_jax.__file__))
CONFIGLIB_MAY_IMPORT = {"restem_jax.errors"}


def _module_names(package_dir: str) -> dict[str, str]:
  """{dotted module name: file} of every .py file under the package."""
  out = {}
  root = os.path.dirname(package_dir)
  for dirpath, _, files in os.walk(package_dir):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(dirpath, f)
  return out


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
  """(imported module, names taken from it) of every import that can run."""
  out = []

  def visit(node):
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      for child in node.orelse:
        visit(child)
      return
    if isinstance(node, ast.Import):
      out.extend((a.name, []) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      out.append((base, [a.name for a in node.names]))
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  return out


def import_graph(package_dir: str = PACKAGE_DIR) -> dict[str, set[str]]:
  """{module: the package's modules it imports} for every module of the package."""
  modules = _module_names(package_dir)
  graph = {}
  for name, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    edges = set()
    for target, names in _imports(tree, name, path.endswith("__init__.py")):
      subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
      edges.update(subs)
      if target in modules and (not names or len(subs) < len(names)):
        edges.add(target)  # `import target`, or names defined in target itself
    edges.discard(name)
    graph[name] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def strongconnect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  return sorted(out)


def _path(graph: dict[str, set[str]], comp: list[str]) -> str:
  """One closed walk through a cycle's modules, for the failure message."""
  start, members = comp[0], set(comp)
  walk, seen = [start], {start}
  while True:
    nxt = sorted(graph[walk[-1]] & members)
    back = [n for n in nxt if n == start]
    fresh = [n for n in nxt if n not in seen]
    if back and len(walk) > 1 or not fresh:
      return " -> ".join(walk + [back[0] if back else nxt[0]])
    walk.append(fresh[0])
    seen.add(fresh[0])


GRAPH = import_graph()


def test_the_graph_sees_every_kind_of_import():
  # Guards against a parser that finds nothing: edges this test knows are there.
  assert "restem_jax.errors" in GRAPH["restem_jax.configlib"]  # from restem_jax import errors
  assert "restem_jax.tasks" in GRAPH["restem_jax.preflight"]  # a package's own names
  assert "restem_jax.tasks.chat" in GRAPH["restem_jax.preflight"]  # from pkg import submodule
  assert "restem_jax.rewards.math" in GRAPH["restem_jax.tasks.scoring"]  # inside a function
  assert "restem_jax.tasks.spec" in GRAPH["restem_jax.tasks.datasets.gsm8k"]
  assert len(GRAPH) >= 50


def test_cycle_finder_on_a_hand_made_graph():
  g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}}
  assert cycles(g) == [["a", "b", "c"]]
  assert _path(g, ["a", "b", "c"]) == "a -> b -> c -> a"


def test_no_import_cycles():
  found = cycles(GRAPH)
  assert not found, "import cycles: " + "; ".join(_path(GRAPH, c) for c in found)


def test_configlib_sits_at_the_bottom():
  extra = GRAPH["restem_jax.configlib"] - CONFIGLIB_MAY_IMPORT
  assert not extra, f"configlib imports {sorted(extra)}; it may import only " \
                    f"{sorted(CONFIGLIB_MAY_IMPORT)} (checks that read data: preflight.py)"


def test_workdir_does_not_import_configlib():
  assert "restem_jax.configlib" not in GRAPH["restem_jax.workdir"]


def test_rewards_import_nothing_from_tasks():
  bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if m.startswith("restem_jax.rewards")
               for t in ts if t == "restem_jax.tasks" or t.startswith("restem_jax.tasks."))
  assert not bad, f"rewards/ imports tasks/: {bad}"


def test_preflight_sits_above_what_it_checks():
  assert {"restem_jax.configlib", "restem_jax.tasks", "restem_jax.workdir"} <= \
      GRAPH["restem_jax.preflight"]
  below = [m for m, ts in GRAPH.items() if "restem_jax.preflight" in ts]
  assert set(below) <= {"restem_jax.main", "restem_jax.run"}, below
