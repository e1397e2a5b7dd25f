"""The architecture table (docs/architecture.md, linked from the README) is a document the code keeps true:
every module of ``src`` has a row, and each row's "imports (from src)" is exactly what that module imports
from ``src``."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
ARCHITECTURE = REPO_ROOT / "docs" / "architecture.md"


def readme_table() -> dict[str, set[str]]:
    """``{module: imported src modules}`` from the "Modules" table of docs/architecture.md. A row may name several
    modules (`` `metrics`, `thresholds` ``): they share the row's imports. "—" means none."""
    text = ARCHITECTURE.read_text()
    section = text.split("\n## Modules", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        modules = re.findall(r"`([a-z_]+)`", cells[0])
        imports = set(re.findall(r"[a-z_]+", cells[2].replace("—", "")))
        for module in modules:
            assert module not in rows, f"architecture table: {module} has two rows"
            rows[module] = imports
    return rows


def src_imports(path) -> set[str]:
    """The ``src`` modules a file imports (``from src.x import``, ``import src.x``, ``from src import x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "src":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("src."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("src."))
    return found - {path.stem}


def table_differences(table: dict[str, set[str]], modules: dict) -> dict:
    """What the check reports: modules without a row, rows without a module, and each row whose imports are not
    its module's (``modules``: name -> source file)."""
    return {"no row": sorted(set(modules) - set(table)), "no module": sorted(set(table) - set(modules)),
            "imports differ": {name: {"table": sorted(table[name]), "code": sorted(src_imports(path))}
                               for name, path in modules.items() if name in table and table[name] != src_imports(path)}}


def test_every_module_has_a_row_and_its_real_imports():
    modules = {path.stem: path for path in SRC.glob("*.py") if path.stem != "__init__"}
    assert table_differences(readme_table(), modules) == {"no row": [], "no module": [], "imports differ": {}}


def test_the_check_sees_a_wrong_row(tmp_path):
    """The comparison itself can fail: fed a doctored table and a doctored import graph, it names each difference."""
    module = tmp_path / "stage.py"
    module.write_text("from src.config import Config\nfrom src import data\nimport src.model as m\n")
    assert src_imports(module) == {"config", "data", "model"}
    table = readme_table()
    modules = {path.stem: path for path in SRC.glob("*.py") if path.stem != "__init__"}
    doctored_table = {name: imports for name, imports in table.items() if name != "files"} | {"stage": {"config"}}
    cli = tmp_path / "cli.py"  # cli, doctored to import predict as well
    cli.write_text(modules["cli"].read_text() + "\nfrom src.predict import predict\n")
    found = table_differences(doctored_table, modules | {"stage": module, "cli": cli})
    assert found["no row"] == ["files"] and found["no module"] == []
    assert found["imports differ"]["stage"] == {"table": ["config"], "code": ["config", "data", "model"]}
    assert found["imports differ"]["cli"] == {"table": sorted(table["cli"]), "code": sorted(table["cli"] | {"predict"})}
    assert table_differences(table | {"ghost": set()}, modules)["no module"] == ["ghost"]
