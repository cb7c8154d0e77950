"""sinkscope: causal, mechanistic study of attention sinks, in one namespace.

    import sinkscope as ss

    model = ss.load_model("smollm2-135m")
    meas = ss.measure(model, ["The cat sat on the mat.", "Sinks store attention."])
    meas.sink_rate(eps=0.3)[0]                    # Sink_1^0.3 in percent (position 0)
    effect = ss.measure_effect(model, ["The cat sat on the mat."], ss.parse("ablate-mlp:layers=3"))
    ss.view(meas)                                 # the interactive view, in a notebook

Each name is the function of the layer that owns it (``circuits`` observes, ``interventions``
acts, ``sinkscope.reproduce`` runs the papers), imported on first use: ``import sinkscope``
costs nothing, so the command line starts without torch. The layers stay importable for those
who extend them.
"""

from __future__ import annotations

import importlib

#: name in ``sinkscope`` -> (module, attribute; None: the module itself)
_EXPORTS: dict[str, tuple[str, str]] = {
    "load_model": ("circuits.models", "load_model"),
    "tokenize": ("circuits.probes", "tokenize"),
    "measure": ("circuits.measure", "measure"),
    "observe": ("circuits.analyses", "observe"),
    "measure_effect": ("interventions.effect", "measure_effect"),
    "sweep": ("interventions.sweep", "sweep"),
    "parse": ("interventions.registry", "parse_spec"),
    "view": ("circuits.view", "view"),
    "reproduce": ("sinkscope.reproduce", None),  # the package, callable: ss.reproduce(model, out, size="ci")
    # inputs
    "probe_texts": ("circuits.probes", "probe_texts"),
    "default_prepend_bos": ("circuits.probes", "default_prepend_bos"),
    "model_traces": ("circuits.probes", "model_traces"),
    "has_traces": ("circuits.probes", "has_traces"),
    "observe_long_inputs": ("circuits.long_inputs", "observe_long_inputs"),
    # acting
    "output_change": ("interventions.effect", "output_change"),
    "Intervention": ("interventions.base", "Intervention"),
    "register": ("interventions.registry", "register"),
    "spec": ("interventions.registry", "spec"),
    # figures
    "show": ("circuits.paper_plots", "show"),
    # the modules a notebook reads further in (the analyses, the sink anatomy, the figures, the
    # intervention recipes, the pre-training lab), each by its own name
    "analyses": ("circuits.analyses", None),
    "anatomy": ("circuits.anatomy", None),
    "plots": ("circuits.plots", None),
    "paper_plots": ("circuits.paper_plots", None),
    "recipes": ("interventions.recipes", None),
    "lab": ("sinkscope.lab", None),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sinkscope' has no attribute {name!r}; it exports {', '.join(__all__)}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    value = value if attribute is None else getattr(value, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
