"""The notebooks run top to bottom on a test-size ablation and render plots and audio."""

from pathlib import Path

import pytest

from tests.conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(REPO) / "notebooks"


def _run(name: str) -> list[dict]:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


@pytest.fixture
def notebook_env(tiny_ablation, monkeypatch):
    out, _ = tiny_ablation
    monkeypatch.setenv("SLM_ABLATION_DIR", str(out))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    return out


def _kinds(outputs: list[dict]) -> set[str]:
    kinds = {mime for output in outputs for mime in output.get("data", {})}
    if any("<audio" in output.get("data", {}).get("text/html", "") for output in outputs):
        kinds.add("audio")
    return kinds


@pytest.mark.parametrize("name", ["sample_spoken_reply", "ablate_strategies"])
def test_notebook_runs_and_renders_plots_and_audio(notebook_env, name):
    outputs = _run(name)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    kinds = _kinds(outputs)
    assert "image/png" in kinds and "audio" in kinds, kinds
