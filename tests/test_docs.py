"""The documentation matches the repository: every reference to docs/ in code and docs resolves to a file, a numbered
section and a quoted passage; every relative link of the Markdown files resolves; the README's Options and Methods
tables list exactly the options and methods the code has; the Python API page's examples run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nlsr_fast.cli import REFERENCE_PYTHON, cli_reference
from nlsr_fast.methods import METHODS, methods_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Where code, tests and docs live (what a reader of the repository opens); build outputs and venvs are not read.
SOURCE_DIRS = ("nlsr_fast", "kernels", "csrc", "tests", "benches", "experiments", "docs", ".ci")
TOP_FILES = ("README.md", "CONTRIBUTING.md", "SECURITY.md", "Makefile", "pyproject.toml", "setup.py", "CMakeLists.txt",
             "mkdocs.yml", "constraints.txt")
SUFFIXES = {".py", ".md", ".h", ".cpp", ".sh", ".toml", ".yml", ".yaml", ".txt", ""}

# "docs/algorithm.md §3", "docs/algorithm.md §9.5", "docs/algorithm.md §3 "Counts"", "docs/architecture.md, "X""
DOC_REF = re.compile(r'docs/([\w-]+\.md)(?: §(\d+)(?:\.(\d+))?)?(?:,? "([^"]+)")?')


def _source_files() -> list[Path]:
    files = [ROOT / f for f in TOP_FILES if (ROOT / f).is_file()]
    for d in SOURCE_DIRS:
        files += [p for p in sorted((ROOT / d).rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                  and "__pycache__" not in p.parts and "results" not in p.parts]
    return files


def _section(page: str, number: str) -> str:
    """The text of the level-2 section `## <number>. ...` of a docs page, up to the next level-2 heading."""
    text = (DOCS / page).read_text(encoding="utf-8")
    m = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/{page} has no section '## {number}.'"
    return m.group(0)


def test_no_reference_to_documents_outside_the_repository() -> None:
    stale = re.compile(r"\bSPEC\b|\bDESIGN\b|\bSTYLE\b|design notes")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in _source_files() if p.name != "test_docs.py"
            for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if stale.search(line)]
    assert hits == []


def test_every_docs_reference_resolves() -> None:
    refs = 0
    for p in _source_files():
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for page, sec, item, quoted in DOC_REF.findall(line):
                where = f"{p.relative_to(ROOT)}:{n}"
                assert (DOCS / page).is_file(), f"{where}: no docs/{page}"
                text = (DOCS / page).read_text(encoding="utf-8")
                if sec:
                    text = _section(page, sec)
                if item:
                    assert re.search(rf"^{item}\. ", text, re.M), f"{where}: docs/{page} §{sec} has no item {item}"
                if quoted:
                    flat = " ".join(text.split()).lower()
                    assert " ".join(quoted.split()).lower() in flat, f"{where}: {quoted!r} not in docs/{page} §{sec}"
                refs += 1
    assert refs > 40  # the code cites the algorithm page throughout; a regex that matched nothing would pass above


def _markdown_files() -> list[Path]:
    return [ROOT / f for f in ("README.md", "CONTRIBUTING.md", "SECURITY.md", "tests/README.md")] + sorted(
        DOCS.glob("*.md"))


def test_relative_links_resolve() -> None:
    checked = 0
    for md in _markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (md.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{md.relative_to(ROOT)}: link to {target}, which does not exist"
            checked += 1
    assert checked > 10


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(re.findall(r":\s*([\w-]+\.md)\s*$", nav, re.M))


def _table_rows(heading: str) -> list[list[str]]:
    """The body rows of the first table under the README's `## <heading>`, as cells."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section, f"README has no '## {heading}'"
    table = re.search(r"^\|.*?(?=^[^|]|\Z)", section.group(1), re.M | re.S)
    assert table, f"README's '## {heading}' has no table"
    rows = table.group(0).splitlines()[2:]  # past the header and the |---| line
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_readme_options_table_lists_every_realign_flag() -> None:
    from nlsr_fast.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    realign = sub.choices["realign"]  # type: ignore[attr-defined]
    flags = {a.dest for a in realign._actions if a.option_strings and a.dest not in ("help", "config", "verbose")}
    documented = [row[0].strip("`") for row in _table_rows("Options")]
    assert len(documented) == len(set(documented))
    assert set(documented) == flags


def test_readme_methods_table_is_the_registrys() -> None:
    """The README's Methods table is nlsr_fast.methods.methods_table(), which every method's declaration fills."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Methods\n(.*?)(?=^## )", readme, re.M | re.S)
    assert section and methods_table() in section.group(1)
    rows = _table_rows("Methods")
    assert [row[0].split()[0].strip("`") for row in rows] == list(METHODS)
    for row in rows:  # the modes column against the declarations
        name = row[0].split()[0].strip("`")
        assert {m.strip().lower() for m in row[1].split(",")} == set(METHODS[name].modes)


@pytest.mark.skipif(sys.version_info[:2] != REFERENCE_PYTHON, reason="argparse formats help differently elsewhere")
def test_cli_reference_page_is_the_help() -> None:
    """docs/cli.md is every command's --help as the code prints it (regenerate: CONTRIBUTING.md, Documentation)."""
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert page == cli_reference()
    assert all(f"## nlsr-fast {c}" in page for c in ("realign", "verify", "eval", "demo"))
    assert all(f"--{flag.replace('_', '-')}" in page for flag in ("prune_rate", "extra_tensors", "task_regex"))


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / "python-api.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("index", range(3))
def test_python_api_examples_run(index: int, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    code = _examples()[index]
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    if index == 0:  # the realign example printed a restored count out of the 14 modules of the tiny Llama
        m = re.search(r"^(\d+) of (\d+) modules restored$", run.stdout, re.M)
        assert m and m.group(2) == "14" and 0 < int(m.group(1)) < 14, run.stdout[-2000:]


def test_python_api_examples_are_all_tested() -> None:
    assert len(_examples()) == 3
