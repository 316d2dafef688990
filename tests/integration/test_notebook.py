"""examples/quickstart.ipynb runs top to bottom (#48 point 3): executed with nbclient in a fresh kernel, as Jupyter
would, so that it cannot rot — a run with a live-plotting callback, a strategy defined in the notebook, two runs
compared."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_quickstart_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    work = tmp_path / "examples"  # the notebook's directory (runs/ is written there), beside the scenarios it reads
    work.mkdir()
    (tmp_path / "scenarios").symlink_to(ROOT / "scenarios")
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", work)
    nb = nbformat.read(work / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    text = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    images = sum("image/png" in o.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                 for o in cell.outputs)
    assert "FedIT: accuracy 0.000 ->" in text and "uniform FedIT: accuracy" in text
    assert "final accuracy" in text and "uploaded" in text
    assert images >= 3  # each live plot's last frame, and the comparison
    runs = sorted(p.parent for p in (work / "runs").glob("*/summary.json"))
    assert len(runs) == 2 and "uniform_fedit" in (runs[1] / "scenario.yaml").read_text()
