"""The import graph between the project's packages, read from the source (every `import` statement,
at module level or inside functions), and the one-way rules it must follow.

    python -m testing.import_graph [ROOT]     # prints package -> package edges with import counts

The rules (docs/architecture.md): `common` imports no other package of the project; `formats` only
`common`; `models` only `formats` and `common`; `plan` (the parallel layout and the planner) only
`models` and `common`; the stage packages `preprocess`, `convert`, `sft` and `evaluation` import the
shared packages but never each other; nothing in production imports `testing`.
tests/test_architecture.py asserts them.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGES = ("common", "formats", "models", "plan", "preprocess", "convert", "sft", "evaluation", "testing")
ALLOWED = {
    "common": set(),
    "formats": {"common"},
    "models": {"formats", "common"},
    "plan": {"models", "common"},
    "preprocess": {"formats", "common"},
    "convert": {"plan", "models", "formats", "common"},
    "sft": {"plan", "models", "formats", "common"},
    "evaluation": {"formats", "common"},
    "testing": set(PACKAGES) - {"testing"},
}


def _imported_modules(path: Path) -> list[str]:
    """The dotted names of the modules `path` imports absolutely (relative imports left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def _imported_packages(path: Path) -> list[str]:
    return [name for name in (module.split(".")[0] for module in _imported_modules(path)) if name in PACKAGES]


def family_imports(root: str | Path) -> list[str]:
    """'file imports module' for each import of a model package (models/<package>/: a family, or the
    decoder the dense families share) from outside the model packages, other than by
    models/registry.py, tests/ and testing/: the registry is the only way to a family."""
    root = Path(root)
    packages = {p.parent.name for p in (root / "models").glob("*/__init__.py")}
    allowed = {root / "models" / "registry.py"}
    # The project's own files: top-level scripts and every visible folder but the tests' (not .venv).
    folders = [
        p
        for p in sorted(root.iterdir())
        if p.is_dir() and p.name not in ("tests", "testing") and p.name[0] != "."
    ]
    paths = [*sorted(root.glob("*.py")), *(f for folder in folders for f in sorted(folder.rglob("*.py")))]
    found = []
    for path in (p for p in paths if p not in allowed):
        relative = path.relative_to(root)
        for module in _imported_modules(path):
            parts = module.split(".")
            if parts[0] == "models" and len(parts) > 1 and parts[1] in packages:
                if relative.parts[0] != "models" or relative.parts[1] not in packages:
                    found.append(f"{relative} imports {module}")
    return found


def package_graph(root: str | Path) -> Counter:
    """(importing package, imported package) -> number of import statements, for the packages that exist
    under `root` (relative imports stay inside their package and are not edges)."""
    root = Path(root)
    edges: Counter = Counter()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            for imported in _imported_packages(path):
                if imported != package:
                    edges[(package, imported)] += 1
    return edges


def violations(edges: Counter) -> list[str]:
    return [
        f"{a} imports {b} ({n}x)" for (a, b), n in sorted(edges.items()) if b not in ALLOWED.get(a, set())
    ]


def format_graph(edges: Counter) -> str:
    lines = []
    for package in PACKAGES:
        targets = sorted((b, n) for (a, b), n in edges.items() if a == package)
        if targets or any(a == package for a, _ in edges):
            lines.append(f"{package:<11} -> " + ", ".join(f"{b} ({n})" for b, n in targets))
    return "\n".join(lines)


if __name__ == "__main__":
    graph = package_graph(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    print(format_graph(graph))
    problems = violations(graph)
    print("\n".join(["", "violations:", *problems]) if problems else "\nno violations")
