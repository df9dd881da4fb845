"""The layering the code keeps: data flows from the trainer to the export, never back, and no module needs itself
through others (a cycle makes import order matter and hides which part owns what)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "export")


def _module_imports() -> dict[str, set[str]]:
  """{module: the project modules it imports}, lazy imports in functions included (they are dependencies too);
  imports only for type checking left out."""
  graph = {}
  for path in sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for inner in ast.walk(node)}
    imported = set()
    for node in ast.walk(tree):
      if id(node) in typing_only:
        continue
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
        # `from trainer import data` names a module; `from trainer.config import Config` a module's member.
        imported |= ({f"{node.module}.{alias.name}" for alias in node.names} if node.module in PACKAGES
                     else {node.module})
      elif isinstance(node, ast.Import):
        imported |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    graph[name] = imported
  return graph


def test_the_trainer_never_imports_the_export():
  graph = _module_imports()
  importers = {name for name, imported in graph.items()
               if name.startswith("trainer") and any(i == "export" or i.startswith("export.") for i in imported)}
  assert not importers, importers


def test_the_training_commands_find_the_export_the_installed_project_registers(monkeypatch):
  """The one place the two meet is the package metadata (setup.cfg's entry point), read when a command starts."""
  from export import end_of_run
  from trainer.errors import UserInputError
  from trainer.loop import finish
  assert isinstance(finish.installed_exporter(), end_of_run.SavedModelExport)
  with pytest.raises(UserInputError, match="No end-of-run export 'onnx' is installed.*pip install -e"):
    finish.installed_exporter("onnx")


def test_no_module_imports_itself_through_others():
  graph = _module_imports()
  state: dict[str, str] = {}

  def cycle_from(name: str, path: list[str]) -> list[str] | None:
    state[name] = "open"
    for imported in sorted(graph.get(name, ())):
      if imported not in graph:
        continue
      if state.get(imported) == "open":
        return path[path.index(imported):] + [imported] if imported in path else [name, imported]
      if imported not in state:
        found = cycle_from(imported, path + [imported])
        if found:
          return found
    state[name] = "done"
    return None

  for name in graph:
    if name not in state:
      found = cycle_from(name, [name])
      assert found is None, " -> ".join(found)
