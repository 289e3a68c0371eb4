"""The layering of docs/architecture.md, checked by import-linter on every test run."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Return (line, module) of every import in ``path``, relative imports resolved against its package."""
    return _imports(path.read_text(), ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]), str(path))


def _imports(source: str, package: str, filename: str = "<source>") -> list[tuple[int, str]]:
    import ast

    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            elif node.module:
                module = node.module
            else:
                continue
            out.append((node.lineno, module))
            # A name imported from a package may be a module of it (``from . import test_x``).
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
    return out


def test_tests_share_helpers_through_tests_support_only():
    """No test module imports another test module or a conftest: shared helpers live in tests/support."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line, module in _imported_modules(path):
            leaf = module.rsplit(".", 1)[-1]
            if module.startswith("tests.") and not module.startswith("tests.support") and (leaf.startswith("test_") or leaf == "conftest"):
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert offenders == [], "move what they share to tests/support/:\n" + "\n".join(offenders)


def test_the_import_check_sees_relative_and_from_package_imports():
    source = "from . import test_dashboard_browser as base\nfrom tests.browser import conftest\nfrom .test_charts import page\n"
    found = {m for _, m in _imports(source, "tests.browser")}
    assert {"tests.browser.test_dashboard_browser", "tests.browser.conftest", "tests.browser.test_charts"} <= found
