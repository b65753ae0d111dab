"""The repository explains itself: every document a source file cites is in the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("DESIGN" + ".md", "../" + "shared")  # documents that are not part of the project
SOURCES = [p for d in ("sphinx_edge", "export", "runtime", "benchmarks", "tests", "docs", "recipes")
           for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".js", ".mjs", ".cpp", ".h", ".md", ".sh", ".toml")
           and "node_modules" not in p.parts] + [ROOT / "README.md", ROOT / "Makefile"]


def test_cited_documents_exist_in_the_repository():
    cited = {}
    for source in SOURCES:
        text = source.read_text(errors="replace")
        for outside in OUTSIDE:  # this file names them to look for them
            assert outside not in text or source == Path(__file__), f"{source} points outside the repository"
        for doc in re.findall(r"\b((?:docs|runtime/\w+|benchmarks)/[\w.-]+\.md)\b", text):
            cited.setdefault(doc, source)
    assert "docs/ARCHITECTURE.md" in cited
    missing = {doc: str(src.relative_to(ROOT)) for doc, src in cited.items() if not (ROOT / doc).is_file()}
    assert not missing, missing
