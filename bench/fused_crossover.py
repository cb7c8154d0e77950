"""measure() with fused=True against fused=False on smollm2-135m, 128 to 1,024 tokens.

Why: where the fused default (issue 12) starts to pay at short lengths; same process, 2
threads, best of two runs each, batches of about 2,048 tokens. Figures in BENCHMARKS.md.

    python bench/fused_crossover.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from circuits.measure import measure  # noqa: E402
from circuits.models import load_model  # noqa: E402
from circuits.probes import reasoning_texts, tokenize  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    model = load_model("smollm2-135m")
    text = " ".join(reasoning_texts())
    for tokens, n in ((128, 16), (256, 8), (512, 4), (1024, 2)):
        batch = tokenize(model, [text[i * 300:] for i in range(n)], max_tokens=tokens)
        measure(model, batch, progress=False, fused=False)  # warm-up
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for fused in (False, True, False, True):
            start = time.perf_counter()
            measure(model, batch, progress=False, fused=fused)
            seconds[fused].append(time.perf_counter() - start)
        eager, fast = min(seconds[False]), min(seconds[True])
        print(f"T={tokens} n={n}: eager {eager:.2f} s, fused {fast:.2f} s, fused/eager {fast / eager:.2f}", flush=True)


if __name__ == "__main__":
    main()
