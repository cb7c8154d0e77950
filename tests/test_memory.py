"""The memory estimate of a measurement (circuits.memory) and the command's refusal up front."""

from __future__ import annotations

import pytest

from circuits.memory import RUNTIME_BYTES, MemoryEstimateError, check_fits, estimate_measure_bytes
from helpers import expect_bad_input


def test_estimate_of_tiny_llama_by_hand(llama):
    """d_model 64, 4 heads (2 KV) of 16, d_mlp 128, 4 layers, vocab 259, float32, 100 tokens."""
    est = estimate_measure_bytes(llama, 100, fused=True)
    assert est.terms["blockwise statistics"] == 3 * 4 * 100 * 100 * 4
    assert "key-value cache" not in est.terms  # the driver runs with use_cache=False
    assert est.terms["loss chunk"] == 3 * 100 * 259 * 4
    assert est.total - RUNTIME_BYTES == 1_400_624 - 2 * 4 * 100 * 2 * 16 * 4
    eager = estimate_measure_bytes(llama, 100, fused=False)
    assert eager.terms["attention patterns"] == 5 * 4 * 100 * 100 * 4 and eager.terms["HF masks"] == 100 * 100 * 4


def test_fused_grows_linearly_and_eager_quadratically(llama):
    def extra(t, fused):
        return estimate_measure_bytes(llama, t, fused=fused).total - RUNTIME_BYTES

    # affine in T once a block of the attention loop is at its smallest (16 queries: stats_block)
    assert extra(131072, True) - extra(98304, True) == extra(98304, True) - extra(65536, True)
    assert extra(8192, True) < 2.1 * extra(4096, True)  # and never worse than linear before that
    assert extra(16384, False) > 3.9 * extra(8192, False)
    assert estimate_measure_bytes(llama, 8192, 2).total - RUNTIME_BYTES == 2 * extra(8192, True)


def test_a_request_beyond_free_memory_is_refused_with_the_estimate(llama):
    assert check_fits(llama, 100, available=10**12).total > 0
    with pytest.raises(MemoryEstimateError, match=r"1 x 100000 tokens would need about [\d.]+ GB \(.*\) with fused attention, but 1.0 GB is free"):
        check_fits(llama, 100_000, available=10**9)


def test_measure_refuses_before_the_forward(tmp_path, capsys, monkeypatch):
    import circuits.memory

    monkeypatch.setattr(circuits.memory, "available_bytes", lambda device="cpu": 10**8)
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--text", "a sink, at last"])
    assert "would need about" in msg and "--max-tokens" in msg
