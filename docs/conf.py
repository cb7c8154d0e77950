"""Sphinx configuration of sinkscope's documentation site (``make docs``).

The pages are Markdown (myst-parser); the executed notebooks of ``docs/notebooks/`` are shown with
their stored outputs (myst-nb, never re-run here: ``make notebooks`` executes them); the API reference
is generated from the docstrings (autodoc + autosummary, stubs under ``api/generated/``, not committed).
The build is offline: no intersphinx inventory is fetched, so references to other projects' types
(torch, numpy, the standard library, ...) are listed in ``nitpick_ignore_regex`` below, and every
reference to sinkscope's own objects must resolve (``-n -W``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

project = "sinkscope"
author = "the sinkscope authors"
copyright = "2026, the sinkscope authors"
release = version = "0.1.0"

extensions = [
    "myst_nb",  # Markdown pages (it loads myst-parser) and notebooks with their stored outputs
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary writes its stubs in it
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# ------------------------------------------------------------------------------ Markdown
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "html_image", "attrs_inline"]
myst_heading_anchors = 3
# the reports and notebooks are written for GitHub: a heading may skip a level there
suppress_warnings = ["myst.header"]

# ------------------------------------------------------------------------------ notebooks
nb_execution_mode = "off"  # show the outputs `make notebooks` stored; never execute at build time
nb_output_stderr = "show"

# ------------------------------------------------------------------------------ API reference
autosummary_generate = True
autosummary_imported_members = False
autosummary_ignore_module_all = False  # the summary tables list what autodoc documents: a module's __all__
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_class_signature = "separated"
napoleon_google_docstring = True  # the house style: "Args:" and "Returns:" sections
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Class attributes", "params_style"), ("Modes", "params_style")]
napoleon_use_ivar = True  # "Attributes:" as fields: a dataclass field is then described once, by autodoc

# Nitpicky: every cross-reference must resolve. Without network there is no intersphinx inventory,
# so the other projects' names are accepted here by module; a name of circuits, interventions or
# sinkscope that does not resolve still fails the build.
nitpicky = True
_EXTERNAL = [
    # the standard library
    "abc", "argparse", "collections", "concurrent", "contextlib", "dataclasses", "datetime", "enum",
    "contextvars", "functools", "hashlib", "io", "json", "logging", "os", "pathlib", "random", "re",
    "signal", "subprocess", "tempfile", "threading", "types", "typing", "typing_extensions", "zipfile",
    # the scientific stack and the model libraries
    "torch", "numpy", "np", "pandas", "pd", "scipy", "matplotlib", "plt", "transformer_lens",
    "transformers", "safetensors", "gguf", "jaxtyping", "tokenizers", "tqdm", "pyarrow", "platformdirs",
]
nitpick_ignore_regex = [(r"py:.*", rf"{name}(\..*)?") for name in _EXTERNAL] + [
    # jaxtyping annotations (Float[Tensor, "batch pos"]) are rendered as text that Sphinx splits into
    # names: the array types as written in them, and the pieces of the quoted shape string
    ("py:class", r"Tensor|ndarray|Float|Int|Bool|Shaped|Num|Integer"),
    ("py:class", r"'.*|.*'|'"),
    # a TypeVar in a signature (register's T) has no page of its own
    ("py:class", r"interventions\.registry\.T"),
]

# ------------------------------------------------------------------------------ HTML
html_theme = "furo"
html_title = "sinkscope"
html_static_path = ["_static"]
html_extra_path: list[str] = []
html_theme_options = {"navigation_with_keys": True}


# ------------------------------------------------------------------------------ docstring conventions
import re  # noqa: E402

from sphinx.ext import napoleon  # noqa: E402

#: ``|x|`` in a docstring is an absolute value (``|cos(h_t, h_0)|``, ``|value|``), never a reST
#: substitution; outside inline literals it is escaped before the docstring is parsed
_ABSOLUTE = re.compile(r"(?<![\\|\w])\|([^|\s`](?:[^|`]*?[^|\s`])?)\|(?![|\w])")


def _escape_absolute_values(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        pieces = line.split("``")  # even pieces are outside inline literals
        lines[i] = "``".join(_ABSOLUTE.sub(r"\\|\1\\|", piece) if k % 2 == 0 else piece for k, piece in enumerate(pieces))


def _google_sections(app, what, name, obj, options, lines):
    """Napoleon's "Args:" / "Returns:" / "Attributes:" sections for functions, classes and modules; an
    attribute's ``#:`` comment is prose (napoleon would read "text (more): rest" as "name (type): ...")."""
    if what not in ("attribute", "data", "property"):
        napoleon._process_docstring(app, what, name, obj, options, lines)


def _resolve_unqualified(app, env, node, contnode):
    """A docstring names an object of another module by its bare name (``:class:`InterventionError```,
    ``:func:`bootstrap_ci```): resolve it when exactly one documented object has that name, as Sphinx
    does for a target written with a leading dot. A name that matches none, or several, stays an error."""
    if node.get("refdomain") != "py" or node.get("refspecific"):
        return None
    domain = env.get_domain("py")
    target = node["reftarget"].lstrip("~")
    matches = domain.find_obj(env, node.get("py:module"), node.get("py:class"), target, node["reftype"], 1)
    if len(matches) != 1:
        return None
    name, obj = matches[0]
    from sphinx.util.nodes import make_refnode

    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)


def setup(app):
    # napoleon is loaded for its settings and the fields it adds; its docstring hook is replaced by
    # _google_sections, which skips attributes
    for listener in list(app.events.listeners.get("autodoc-process-docstring", [])):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", _escape_absolute_values, priority=400)
    app.connect("autodoc-process-docstring", _google_sections, priority=450)
    app.connect("missing-reference", _resolve_unqualified)
