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
    import ast

    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            elif node.module:
                out.append((node.lineno, node.module))
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
