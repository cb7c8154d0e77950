"""``import sinkscope as ss``: one namespace over the layers, imported lazily."""

from __future__ import annotations

import pytest

import sinkscope as ss
from helpers import heavy_modules_after


def test_importing_sinkscope_imports_neither_torch_nor_the_layers():
    assert heavy_modules_after("import sinkscope", ("torch", "transformers", "circuits.measure", "interventions.effect")) == []


def test_each_name_is_the_layers_own_function():
    from circuits.analyses import observe
    from circuits.measure import measure
    from circuits.models import load_model
    from interventions.effect import measure_effect
    from interventions.registry import parse_spec

    assert (ss.load_model, ss.measure, ss.observe, ss.measure_effect, ss.parse) == (load_model, measure, observe, measure_effect, parse_spec)
    assert set(ss.__all__) <= set(dir(ss))


def test_every_export_is_what_its_layer_defines():
    """Each of ``ss``'s names is the very object of the module that owns it, functions and the
    modules a notebook reads further in alike, so ``ss`` adds no second copy of anything."""
    import importlib

    from sinkscope import _EXPORTS

    for name, (module, attribute) in _EXPORTS.items():
        owner = importlib.import_module(module)
        assert getattr(ss, name) is (owner if attribute is None else getattr(owner, attribute)), name


def test_the_notebooks_work_through_ss():
    """Every notebook imports ``sinkscope as ss`` and reaches the layers through it (the paper
    modules and the lab's configuration come from their own ``sinkscope`` packages)."""
    import json
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb")):
        code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert "import sinkscope as ss" in code, path.name
        assert not [line for line in code.splitlines() if line.startswith(("from circuits", "from interventions", "import circuits"))], path.name


def test_an_unknown_name_says_what_is_exported():
    with pytest.raises(AttributeError, match="has no attribute 'mesure'; it exports .*measure"):
        ss.mesure  # noqa: B018


def test_a_notebook_session_in_one_namespace():
    """Texts in, results out: measure, observe (returns its meters' results), an effect."""
    from circuits.analyses import KVMeter
    from circuits.measure import SinkMeter

    model = ss.load_model("tiny-llama")
    meas = ss.measure(model, ["the cat sat on the mat", "a b c d e f"])
    assert meas.n_sequences == 2 and 0.0 <= meas.sink_rate(0.3)[0] <= 100.0
    batch = ss.tokenize(model, ["the cat sat on the mat", "a b c d e f"])
    sinks, kv = ss.observe(model, batch, [SinkMeter(model), KVMeter(model)])
    assert sinks.alpha.shape == meas.alpha.shape and kv.attn_first.shape[0] == 2
    effect = ss.measure_effect(model, ["the cat sat on the mat", "a b c d e f", "x y z w"], ss.parse("ablate-mlp:layers=1"),
                               n_resamples=0)
    assert "sink_score" in set(effect.frame["metric"])


def test_ss_reproduce_runs_the_papers_whether_or_not_the_package_was_imported_first(monkeypatch):
    """Importing sinkscope.reproduce sets the package as ``ss.reproduce``; the package is callable
    and runs :func:`sinkscope.reproduce.report.reproduce`."""
    import sys

    import sinkscope.reproduce.report  # noqa: F401  (the subpackage, imported first)

    seen = []
    monkeypatch.setattr(sys.modules["sinkscope.reproduce"], "reproduce", lambda *a, **k: seen.append((a, k)) or "ran")
    assert ss.reproduce("tiny-llama", "out", size="ci") == "ran" and seen == [(("tiny-llama", "out"), {"size": "ci"})]
    assert ss.reproduce.redraw is sys.modules["sinkscope.reproduce.report"].redraw
