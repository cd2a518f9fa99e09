"""The notebooks run top to bottom without error (nbclient), and their conclusions come from the run."""

import nbformat
import pytest
from nbclient import NotebookClient


def execute(path, cwd):
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return book


def text_of(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)


def test_capacity_planning_notebook(repo, tmp_path):
    book = execute(repo / "notebooks" / "capacity_planning.ipynb", tmp_path)
    conclusion = text_of(book.cells[-1])
    assert conclusion.startswith("At 150 jobs/hour") and "dedicated" in conclusion and "muxtune" in conclusion
    assert any(o.get("data", {}).get("image/png") for c in book.cells if c.cell_type == "code" for o in c.outputs)


def test_plan_explorer_notebook(repo, tmp_path):
    book = execute(repo / "notebooks" / "plan_explorer.ipynb", tmp_path)
    images = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.get("data", {}).get("image/png")]
    assert len(images) == 3
    assert "fastest predicted" in text_of(book.cells[-1])
