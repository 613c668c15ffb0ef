"""examples/tutorial.ipynb runs top to bottom on the built-in model in its quick configuration (nbclient)."""

import pytest

from ..conftest import REPO

pytestmark = pytest.mark.integration


@pytest.mark.timeout(1200)
def test_tutorial_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("FRC_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("FRC_TUTORIAL_OUT", str(tmp_path))
    nb = nbformat.read(REPO / "examples" / "tutorial.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "entity_location" in outputs and "faithfulness" in outputs
    assert (tmp_path / "eiffel-tower.json").is_file()
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())
    assert "Error" not in outputs, outputs[-2000:]
