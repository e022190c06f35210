"""The contract lives in the repository: ``docs/semantics.md`` exists, the README and the
docstrings cite it, it names every argument of ``paged_attention``, and no tracked file
points at the team's shared folder, which users never see."""
import inspect
import re
import subprocess
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
