"""docs/reference-walkthrough.ipynb runs from top to bottom (so it cannot rot): about 20 s."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / "docs" / "reference-walkthrough.ipynb"


def test_reference_walkthrough_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    # every code cell ran; a failing cell (including its asserts) raises CellExecutionError above
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
