"""``bench/gpu_check.py --lab``: the pre-training lab's Sink_1-over-tokens curve, dry-run on the CPU.

The command is meant for a CUDA GPU and an 8-minute budget; here it runs the same code on the
CPU with a tiny model, the builtin corpus and a budget of seconds, and the test checks what it
writes: one curve per variant (softmax, sigmoid-nonorm, key-bias), tokens rising with steps and
time, rates in percent, the key-bias slot's own rate, and the figure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from helpers import ROOT

TINY = ["--corpus", "builtin", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-mlp", "64", "--n-ctx", "32",
        "--batch-size", "4", "--sink-sequences", "8", "--sink-tokens", "16", "--val-windows", "4", "--warmup-steps", "5"]


def _run(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_the_lab_curve_runs_each_variant_for_its_share_of_the_budget(tmp_path):
    out = tmp_path / "lab"
    done = _run("--lab", "--device", "cpu", "--budget-s", "4.5", "--lab-out", str(out), *TINY)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((out / "sink_curve.json").read_text())
    assert doc["schema"] == "sinkscope.gpu_lab/1" and doc["budget_s"] == 4.5 and doc["seconds_per_variant"] == 1.5
    assert list(doc["variants"]) == ["softmax", "sigmoid-nonorm", "key-bias"]
    assert doc["config"]["d_model"] == 32 and doc["corpus"]["name"] == "builtin" and doc["dtype"] == "float32"
    per_step = 4 * 32
    for variant, run in doc["variants"].items():
        recs = run["records"]
        assert len(recs) >= 3 and recs[0]["step"] == 0 and recs[-1]["step"] == run["steps"] > 0
        steps = [r["step"] for r in recs]
        assert steps == sorted(set(steps)) and all(r["tokens"] == r["step"] * per_step for r in recs)
        # spaced by a factor of about 1.4: each next evaluation at ceil(step * sqrt(2)) (at least step + 1), or the last step
        assert all(b == max(a + 1, math.ceil(a * math.sqrt(2))) or b == run["steps"] for a, b in zip(steps, steps[1:]))
        assert all(0 <= r["sink_rate"] <= 100 and r["val_loss"] > 0 for r in recs)
        assert 1.5 <= run["seconds"] < 1.5 + 30  # it trained for its share, then evaluated once more
        assert run["tokens"] == run["steps"] * per_step and run["epochs"] == run["tokens"] / doc["corpus"]["train_tokens"]
        assert ("bias_sink_rate" in recs[-1]) == (variant == "key-bias")
    assert (out / "sink_curve.png").stat().st_size > 10_000
    assert "| softmax |" in done.stdout and "wrote" in done.stdout


def test_without_a_gpu_the_lab_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - a GPU machine runs the real thing
        return
    done = _run("--lab", "--lab-out", str(tmp_path / "none"), timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is False); nothing to check"]
    assert not (tmp_path / "none").exists()


def test_a_budget_that_is_not_positive_is_refused():
    done = _run("--lab", "--device", "cpu", "--budget-s", "0", *TINY, timeout=120)
    assert done.returncode == 2 and "--budget-s must be a positive number of seconds, got 0.0" in done.stderr
