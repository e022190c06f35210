"""The contract lives in the repository: ``docs/semantics.md`` exists, the README and the
docstrings cite it, it names every argument of ``paged_attention``, and no tracked file
points at the team's shared folder, which users never see. The documentation site: every
page mkdocs.yml's nav lists exists, the API page covers ``cupy_paged.__all__``, and with the
docs extra installed ``mkdocs build --strict`` passes."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cupy_paged
from cupy_paged import reference

REPO = Path(__file__).resolve().parents[1]
CONTRACT = "docs/semantics.md"
# Built from parts so that this file does not point at the folder itself.
SHARED = re.compile(r"(?<![\w./-])" + "shared" + "/")


def tracked_files():
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an sdist or a wheel): no tracked files to read")
    return [REPO / name for name in done.stdout.decode().split("\0") if name]


def test_no_tracked_file_points_at_the_shared_folder():
    pointing = []
    for path in tracked_files():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("benchmarks/results/") or not path.is_file():
            continue          # raw logs quote whatever the run printed
        data = path.read_bytes()
        if b"\0" in data:
            continue          # binary
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if SHARED.search(line):
                pointing.append(f"{rel}:{number}: {line.strip()[:120]}")
    assert not pointing, "point at docs/ instead:\n" + "\n".join(pointing)


def test_the_readme_and_docstrings_cite_the_contract_in_the_repository():
    assert (REPO / CONTRACT).is_file()
    assert CONTRACT in (REPO / "README.md").read_text()
    for documented in (cupy_paged.paged_attention, reference,
                       reference.paged_attention_reference):
        assert CONTRACT in inspect.getdoc(documented), documented


def test_the_contract_names_every_argument_of_paged_attention():
    text = (REPO / CONTRACT).read_text()
    names = inspect.signature(cupy_paged.paged_attention).parameters
    missing = [name for name in names if not re.search(rf"`{name}[`=]", text)]
    assert not missing, f"{CONTRACT} does not say what these arguments do: {missing}"


# ---------------------------------------------------------------- the documentation site

MKDOCS = REPO / "mkdocs.yml"
# A nav entry of mkdocs.yml: "  - Title: page.md" (or a bare "  - page.md").
NAV_ENTRY = re.compile(r"^\s*-\s+(?:[^:\n]+:\s+)?(\S+\.(?:md|ipynb))\s*$")


def nav_pages():
    """The pages mkdocs.yml's nav lists, in order (read without a YAML parser: the test extra
    does not install one)."""
    lines = MKDOCS.read_text().splitlines()
    start = lines.index("nav:")
    pages = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith((" ", "-")):
            break                 # the next top-level key
        m = NAV_ENTRY.match(line)
        if m:
            pages.append(m.group(1))
    return pages


def test_every_page_in_the_nav_exists():
    if not MKDOCS.is_file():
        pytest.skip("mkdocs.yml is not here (an sdist or a wheel)")
    pages = nav_pages()
    assert len(pages) >= 10, pages
    assert CONTRACT.removeprefix("docs/") in pages, "the contract is not in the nav"
    missing = [p for p in pages if not (REPO / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages docs/ lacks: {missing}"
    assert len(set(pages)) == len(pages), "a page is listed twice"


def test_the_notebook_page_is_the_example_notebook():
    if not MKDOCS.is_file():
        pytest.skip("mkdocs.yml is not here (an sdist or a wheel)")
    page = REPO / "docs" / "cache_layouts.ipynb"
    assert "cache_layouts.ipynb" in nav_pages()
    assert page.resolve() == (REPO / "examples" / "cache_layouts.ipynb").resolve(), \
        "docs/cache_layouts.ipynb should link to examples/cache_layouts.ipynb, not copy it"


def test_the_api_page_documents_every_public_name():
    api = REPO / "docs" / "api.md"
    if not api.is_file():
        pytest.skip("docs/api.md is not here (an sdist or a wheel)")
    text = api.read_text()
    missing = [name for name in cupy_paged.__all__
               if name != "__version__" and f"::: cupy_paged.{name}\n" not in text]
    assert not missing, f"docs/api.md has no '::: cupy_paged.NAME' for: {missing}"


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                   "mkdocs_jupyter"):
        pytest.importorskip(module, reason='the docs extra: pip install ".[docs]"')
    if not MKDOCS.is_file():
        pytest.skip("mkdocs.yml is not here (an sdist or a wheel)")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()
