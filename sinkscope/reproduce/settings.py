"""The size knobs of a reproduction run, and the two named sizes.

Why a module of its own: the three paper modules, the report and the notebooks all read the
same knobs, and ``numbers.json`` stores them, so a reader can tell what a run measured on.
``"full"`` is the committed reports' setting; ``"ci"`` shrinks every count and length so the
notebooks and tests run in a minute or two; ``"long"`` runs Wong et al.'s analyses alone on
the longest of the model's own sessions, cut to 8,192 tokens (the length their traces have),
where the fused attention path keeps memory linear (:mod:`circuits.fused_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from circuits.long_inputs import LongInputKind

Size = Literal["full", "ci", "long"]
#: the papers a run can reproduce, in report order
PAPERS: tuple[str, ...] = ("wong", "li", "gu")


@dataclass(frozen=True)
class Settings:
    """Every size knob of a reproduction run (stored in ``numbers.json``).

    Long inputs (Wong et al. and the observational parts of Li and Gu): ``n_traces`` long
    inputs of kind ``inputs`` (``auto``: the model's own generated math sessions where it has
    them, the packaged models; else the written reasoning traces) of at most ``max_tokens`` tokens, ``batch_size`` per forward pass; a secondary sink
    is *attended* when it receives at least ``min_score_ratio`` times the median token's
    attention at its peak layer. Dose response (Wong et al.): the sinks of the first
    ``dose_traces`` traces, each one's MLP output rescaled by each of ``dose_factors``.
    Planting (Li et al.): ``plant_n`` probe passages × ``plant_tokens`` tokens, position
    ``plant_position``, variance amplified by each of ``amplify_factors``. Gu et al.:
    Sink_1^eps over ``eps_grid`` on ``eps_n`` passages × ``eps_tokens`` tokens; the key-bias
    runs on ``keybias_n`` × ``keybias_tokens`` tokens with controls at position
    ``keybias_control``; ``other_models`` also measures every other model available offline.
    ``control``: Wong et al.'s analysis again on the model's control sessions, generated with an
    empty system message, where it has them (:func:`sinkscope.reproduce.wong.system_prompt_control`).
    ``papers``: which of :data:`PAPERS` the run reproduces.
    """

    inputs: LongInputKind = "auto"
    n_traces: int = 6
    max_tokens: int = 1024
    batch_size: int = 1
    min_score_ratio: float = 5.0
    skip_first: int | None = None  # positions excluded from detection; None: 3 under a chat template (Wong et al.'s code), else 1
    dose_traces: int = 2
    dose_factors: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    norm_targets: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)  # Wong et al.'s norm intervention (their default 100)
    plant_n: int = 16
    variance_n: int = 64  # Li et al.'s across-batch variance: random-token sequences
    variance_tokens: int = 64
    plant_tokens: int = 64
    plant_position: int = 10  # Li et al.'s k
    amplify_factors: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    eps_n: int = 100
    eps_tokens: int = 64
    eps_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    keybias_n: int = 16
    keybias_tokens: int = 128
    keybias_control: int = 64
    other_models: bool = True
    control: bool = True
    papers: tuple[str, ...] = PAPERS


#: the report's sizes by name
SIZES: dict[str, Settings] = {
    "full": Settings(),
    "ci": Settings(
        n_traces=2, max_tokens=192, batch_size=2, dose_traces=1, dose_factors=(0.0, 1.0, 4.0), plant_n=4, plant_tokens=48, variance_n=16, variance_tokens=32,
        plant_position=10, amplify_factors=(1.0, 2.0, 4.0, 8.0, 16.0), eps_n=8, keybias_n=4, keybias_tokens=64, keybias_control=32,
        other_models=False,
    ),
    # one trace: only the longest sessions reach 8k tokens (one per model is committed); the
    # dose response and norm sweep then run on it (10 forwards of 8k tokens)
    "long": Settings(n_traces=1, max_tokens=8192, dose_traces=1, papers=("wong",)),
}

__all__ = ["PAPERS", "SIZES", "Settings", "Size"]
