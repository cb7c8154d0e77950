"""Prefix reuse (interventions.forward): run_from_layer must be a full forward, minus the prefix.

Every test compares against the bridge's own full forward on the same tokens: logits, hook
values and hook call counts, plus the contract around it (hooks gone after an exception,
skipped blocks really skipped, unfireable hook names refused, left padding, gradients).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.models import list_models, load_model, tiny_model
from interventions.forward import capture_resid_pre, n_blocks, run_from_layer

TINY_ARCHS = ("gpt2", "llama", "gemma3")
N_LAYERS = 4
#: exact: a forward resumed at a block runs the same ops on the same shapes as the full forward
#: from that block on, so it is the same arithmetic, bit for bit, on every kernel path (CI checks
#: two); a tolerance here would hide a block that ran differently
ATOL = 0.0
TEXTS = (
    "The cat sat on the mat, and then it slept for a very long while.",  # 64 bytes: > gemma window 32
    "Attention sinks soak up attention.",  # shorter: right-padded
)
PER_BLOCK_HOOKS = (
    "hook_resid_pre",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_v",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)


def right_padded(model, texts=TEXTS, width: int | None = None) -> torch.Tensor:
    tokens = model.to_tokens(list(texts), prepend_bos=True, padding_side="right")
    return tokens if width is None else tokens[:, :width]


class Clean:
    """A model, a batch, and its clean full forward: logits, every resid_pre, a hook cache."""

    def __init__(self, model, tokens: torch.Tensor):
        self.model, self.tokens = model, tokens
        n = n_blocks(model)
        with torch.no_grad():
            self.logits = model(tokens)
            self.resid = capture_resid_pre(model, tokens, range(n))
        self.n = n

    def full_hook_values(self, names: list[str]) -> dict[str, list[torch.Tensor]]:
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        hooks = [(name, _recorder(seen[name])) for name in names]
        with torch.no_grad():
            self.model.run_with_hooks(self.tokens, fwd_hooks=hooks)
        return seen


def _recorder(into: list):
    def hook(tensor, hook):
        into.append(tensor.detach().clone())

    return hook


@pytest.fixture(scope="module", params=TINY_ARCHS)
def clean(request) -> Clean:
    model = tiny_model(request.param, n_layers=N_LAYERS)
    tokens = right_padded(model)
    assert tokens.shape[0] == 2 and (tokens[1] == model.tokenizer.pad_token_id).any()  # padded row
    return Clean(model, tokens)


def assert_model_clean(model) -> None:
    """No hook left behind, no block left short-circuited, no start/stop state left armed."""
    leftovers = [name for name, hp in model.hook_dict.items() if hp.fwd_hooks]
    assert leftovers == []
    for block in model.blocks:
        assert "forward" not in block.__dict__
        assert getattr(block, "_start_at_layer_idx", None) is None
        assert getattr(block, "_stop_at_layer_idx", None) is None


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("start", [0, 1, 2, N_LAYERS - 1])
def test_logits_match_full_forward(clean: Clean, start: int):
    with torch.no_grad():
        logits = run_from_layer(clean.model, clean.resid[start], start)
    assert logits.shape == clean.logits.shape
    assert (logits - clean.logits).abs().max().item() <= ATOL
    assert_model_clean(clean.model)


@pytest.mark.parametrize("start", [0, 2, N_LAYERS - 1])
def test_hooks_on_run_blocks_fire_once_with_full_forward_values(clean: Clean, start: int):
    layers = sorted({start, clean.n - 1})
    names = [f"blocks.{layer}.{hook}" for layer in layers for hook in PER_BLOCK_HOOKS]
    names += ["ln_final.hook_in", "unembed.hook_out"]
    full = clean.full_hook_values(names)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad():
        run_from_layer(clean.model, clean.resid[start], start, fwd_hooks=[(n, _recorder(seen[n])) for n in names])
    for name in names:
        assert len(full[name]) == 1, name
        assert len(seen[name]) == 1, f"{name} fired {len(seen[name])} times"
        assert seen[name][0].shape == full[name][0].shape, name
        assert torch.allclose(seen[name][0], full[name][0], atol=ATOL, rtol=0), name
    assert_model_clean(clean.model)


def test_blocks_below_start_do_not_run(clean: Clean):
    # blocks 0, 1 are short-circuited: the HF loop still calls them, but their attention never runs
    attn_calls = [0] * clean.n
    handles = [
        block.attn.register_forward_pre_hook(lambda mod, args, i=i: attn_calls.__setitem__(i, attn_calls[i] + 1))
        for i, block in enumerate(clean.model.blocks)
    ]
    try:
        with torch.no_grad():
            run_from_layer(clean.model, clean.resid[2], 2)
    finally:
        for handle in handles:
            handle.remove()
    assert attn_calls == [0, 0, 1, 1]


def test_intervention_matches_full_run_with_hooks(clean: Clean):
    """An edit of the pattern at block 2 (no attention to position 0, renormalised) and of
    hook_z at block 3 gives the same logits from layer 2 as in a full hooked forward."""

    def no_sink(pattern, hook):
        pattern = pattern.clone()
        pattern[..., 1:, 0] = 0
        return pattern / pattern.sum(-1, keepdim=True)

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    hooks = [("blocks.2.attn.hook_pattern", no_sink), ("blocks.3.attn.hook_z", zero_head)]
    with torch.no_grad():
        full = clean.model.run_with_hooks(clean.tokens, fwd_hooks=hooks)
        ours = run_from_layer(clean.model, clean.resid[2], 2, fwd_hooks=hooks)
    assert (full - clean.logits).abs().max().item() > 1e-3  # the intervention does something
    assert (ours - full).abs().max().item() <= ATOL
    assert_model_clean(clean.model)


def test_edited_residual_is_what_the_blocks_see(clean: Clean):
    """Driving from an edited residual equals a full forward with that edit at hook_resid_pre."""
    delta = torch.zeros_like(clean.resid[1])
    delta[:, 0] = 3.0

    def add(resid, hook):
        return resid + delta

    with torch.no_grad():
        full = clean.model.run_with_hooks(clean.tokens, fwd_hooks=[("blocks.1.hook_resid_pre", add)])
        ours = run_from_layer(clean.model, clean.resid[1] + delta, 1)
    assert (ours - full).abs().max().item() <= ATOL


# --------------------------------------------------------------------------- hook lifetime


def test_hook_removed_after_exception_inside_hook(clean: Clean):
    class Boom(Exception):
        pass

    def explode(tensor, hook):
        raise Boom

    with pytest.raises(Boom), torch.no_grad():
        run_from_layer(
            clean.model,
            clean.resid[1],
            1,
            fwd_hooks=[("blocks.2.hook_resid_post", lambda t, hook: t * 0), ("blocks.3.attn.hook_pattern", explode)],
        )
    assert_model_clean(clean.model)
    with torch.no_grad():  # the model is unchanged: a plain full forward is the clean one
        assert torch.equal(clean.model(clean.tokens), clean.logits)
        assert (run_from_layer(clean.model, clean.resid[1], 1) - clean.logits).abs().max().item() <= ATOL


def test_hooks_named_where_they_cannot_fire_are_refused(clean: Clean):
    model, resid = clean.model, clean.resid[2]
    noop = lambda t, hook: None  # noqa: E731
    for name in ("blocks.1.attn.hook_pattern", "blocks.0.hook_resid_post", "hook_embed", "embed.hook_out"):
        with pytest.raises(ValueError, match="never fire"):
            run_from_layer(model, resid, 2, fwd_hooks=[(name, noop)])
    with pytest.raises(ValueError, match="never fire"):
        run_from_layer(model, resid, 2, fwd_hooks=[("ln_final.hook_out", noop)], return_type="resid")
    with pytest.raises(ValueError, match="never fire"):
        run_from_layer(model, resid, 1, fwd_hooks=[("blocks.3.hook_mlp_out", noop)], stop_at_layer=3, return_type="resid")
    assert_model_clean(model)


def test_name_filters_are_narrowed_to_blocks_that_run(clean: Clean):
    fired: list[str] = []
    with torch.no_grad():
        run_from_layer(
            clean.model,
            clean.resid[2],
            2,
            fwd_hooks=[(lambda name: name.endswith("hook_in") and name.count(".") == 2, lambda t, hook: fired.append(hook.name))],
        )
    assert fired == ["blocks.2.hook_in", "blocks.3.hook_in"]
    assert_model_clean(clean.model)


# --------------------------------------------------------------------------- return types, capture


def test_return_resid_and_stop_at_layer(clean: Clean):
    model = clean.model
    final = clean.full_hook_values(["ln_final.hook_in"])["ln_final.hook_in"][0]
    ln_final_calls: list = []
    with torch.no_grad():
        resid = run_from_layer(model, clean.resid[1], 1, return_type="resid")
        assert run_from_layer(model, clean.resid[1], 1, stop_at_layer=n_blocks(model), return_type="resid").shape == resid.shape
        stopped = run_from_layer(model, clean.resid[0], 0, stop_at_layer=3, return_type="resid")
        same = run_from_layer(model, clean.resid[2], 2, stop_at_layer=2, return_type="resid")
        nothing = run_from_layer(
            model, clean.resid[3], 3, return_type=None, fwd_hooks=[("ln_final.hook_in", lambda t, hook: ln_final_calls.append(1))]
        )
    assert (resid - final).abs().max().item() <= ATOL
    assert (stopped - clean.resid[3]).abs().max().item() <= ATOL
    assert torch.equal(same, clean.resid[2])
    assert nothing is None and ln_final_calls == [1]
    assert_model_clean(model)


def test_capture_stores_only_requested_layers_and_stops_early(clean: Clean):
    model = clean.model
    attn_calls = [0] * clean.n
    handles = [
        block.attn.register_forward_pre_hook(lambda mod, args, i=i: attn_calls.__setitem__(i, attn_calls[i] + 1))
        for i, block in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad():
            got = capture_resid_pre(model, clean.tokens, [2, 0, -1, 2])
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(got) == [0, 2, 3]
    assert attn_calls == [1, 1, 1, 0]  # stopped before block 3 ran
    with torch.no_grad():
        _, cache = model.run_with_cache(clean.tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for layer, tensor in got.items():
        assert torch.equal(tensor, cache[f"blocks.{layer}.hook_resid_pre"])
        assert not tensor.requires_grad
    with torch.no_grad():
        logits, both = capture_resid_pre(model, clean.tokens, [1], run="logits")
    assert torch.equal(logits, clean.logits) and list(both) == [1]
    assert_model_clean(model)


def test_capture_all_blocks_runs_every_block_but_not_the_unembed(clean: Clean):
    model, n = clean.model, clean.n
    attn_calls, unembed_calls, last_out = [0] * n, [0], []
    handles = [
        block.attn.register_forward_pre_hook(lambda mod, args, i=i: attn_calls.__setitem__(i, attn_calls[i] + 1))
        for i, block in enumerate(model.blocks)
    ]
    handles.append(model.unembed.register_forward_pre_hook(lambda mod, args: unembed_calls.__setitem__(0, 1)))
    try:
        # a caller's hook on the last block's output still fires (before the stop)
        with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{n - 1}.hook_resid_post", lambda t, hook: last_out.append(t.clone()))]):
            got = capture_resid_pre(model, clean.tokens, [1], run="all_blocks")
    finally:
        for handle in handles:
            handle.remove()
    assert attn_calls == [1] * n and unembed_calls == [0] and len(last_out) == 1
    assert torch.equal(got[1], clean.resid[1])
    with pytest.raises(ValueError, match="run must be"):
        capture_resid_pre(model, clean.tokens, [1], run="everything")
    assert_model_clean(model)


def test_negative_and_numpy_layer_indices(clean: Clean):
    with torch.no_grad():
        last = run_from_layer(clean.model, clean.resid[clean.n - 1], -1)
        second = run_from_layer(clean.model, clean.resid[2], np.int64(2))
    assert (last - clean.logits).abs().max().item() <= ATOL
    assert (second - clean.logits).abs().max().item() <= ATOL
    with pytest.raises(TypeError):
        run_from_layer(clean.model, clean.resid[2], 2.0)


def test_argument_errors(clean: Clean):
    model, resid = clean.model, clean.resid[1]
    with pytest.raises(ValueError, match="out of range"):
        run_from_layer(model, resid, clean.n)
    with pytest.raises(ValueError, match="below start_layer"):
        run_from_layer(model, resid, 2, stop_at_layer=1, return_type="resid")
    with pytest.raises(ValueError, match="return_type"):
        run_from_layer(model, resid, 1, stop_at_layer=3)
    with pytest.raises(ValueError, match="d_model"):
        run_from_layer(model, resid[..., :-1], 1)
    with pytest.raises(ValueError, match=r"\[batch, pos, d_model\]"):
        run_from_layer(model, resid[0], 1)
    with pytest.raises(ValueError, match="attention_mask"):
        run_from_layer(model, resid, 1, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        capture_resid_pre(model, clean.tokens, [])
    assert_model_clean(model)


def test_gradients_flow_to_the_residual(clean: Clean):
    resid = clean.resid[2].clone().requires_grad_(True)
    run_from_layer(clean.model, resid, 2)[:, -1].logsumexp(-1).sum().backward()
    assert resid.grad is not None and resid.grad.abs().sum() > 0


# --------------------------------------------------------------------------- architecture specifics


def test_gemma3_sliding_window_mask_is_applied():
    """Tiny Gemma 3 has sliding_window=32 and a 64-token first row: keys 32+ back are masked."""
    model = tiny_model("gemma3", n_layers=N_LAYERS)
    assert model.original_model.config.layer_types[2] == "sliding_attention"
    tokens = right_padded(model)
    assert tokens.shape[1] > 40
    window = model.original_model.config.sliding_window
    resid = capture_resid_pre(model, tokens, [2])[2]
    got: list = []
    with torch.no_grad():
        run_from_layer(model, resid, 2, fwd_hooks=[("blocks.2.attn.hook_pattern", _recorder(got))])
    pattern = got[0]
    q = torch.arange(pattern.shape[-1])
    outside = (q[:, None] - q[None, :]) >= window
    assert pattern[..., outside].abs().max().item() == 0.0
    assert pattern[0, :, -1, -window].min().item() > 0.0  # the oldest key inside the window


def test_gemma3_global_and_local_layers():
    """Six tiny Gemma 3 layers: 0-4 sliding (local rope), 5 full (global rope)."""
    model = tiny_model("gemma3", n_layers=6)
    layer_types = model.original_model.config.layer_types
    assert layer_types[4] == "sliding_attention" and layer_types[5] == "full_attention"
    clean = Clean(model, right_padded(model))
    for start in (3, 5):
        with torch.no_grad():
            logits = run_from_layer(model, clean.resid[start], start)
        assert (logits - clean.logits).abs().max().item() <= ATOL


def test_left_padding_with_attention_mask():
    """Left padding needs the mask and mask-derived rotary positions, as in the full forward."""
    model = tiny_model("llama", n_layers=N_LAYERS)
    tokens = model.to_tokens(list(TEXTS), prepend_bos=True, padding_side="left")
    mask = (tokens != model.tokenizer.pad_token_id).long()
    assert mask[1, 0] == 0
    with torch.no_grad():
        full = model(tokens, attention_mask=mask)
        resid = capture_resid_pre(model, tokens, [2], attention_mask=mask)[2]
        ours = run_from_layer(model, resid, 2, attention_mask=mask)
    real = mask.bool()
    assert (ours - full)[real].abs().max().item() <= ATOL


# --------------------------------------------------------------------------- real models

REAL_TEXTS = (
    "In the beginning of the story, a small fox lived at the edge of a wide forest. Every morning "
    "it walked down to the river to drink, and every evening it climbed the hill to watch the sun "
    "go down behind the mountains, wondering what lay on the other side of them.",
    "Attention sinks are tokens, often the first one, that receive a large share of attention "
    "from later queries although they carry little meaning.",
)


def _real_model(name: str):
    status = {row.name: row for row in list_models()}[name]
    if not status.ready_offline:
        pytest.skip(f"{name} is not installed: {status.problem}")
    return load_model(name)


def _check_real(model, start_layers, width: int = 48, atol: float = ATOL):
    tokens = right_padded(model, REAL_TEXTS, width=width)
    assert tokens.shape == (2, width)
    with torch.no_grad():
        full, resid = capture_resid_pre(model, tokens, start_layers, run="logits")
        for start in start_layers:
            logits = run_from_layer(model, resid[start], start)
            assert (logits - full).abs().max().item() <= atol, start
    assert_model_clean(model)


@pytest.mark.real
@pytest.mark.numerical
def test_smollm2_from_layer_15_matches_full_forward():
    model = _real_model("smollm2-135m")
    _check_real(model, [15])


@pytest.mark.real
@pytest.mark.slow  # ~10 s load + 3 forwards of a 262k-vocab model
def test_gemma3_270m_from_sliding_layer_matches_full_forward():
    """Start at 3 (sliding): runs sliding 3, 4, global 5, ..., global 17; and start at 11 (global)."""
    model = _real_model("gemma3-270m")
    layer_types = model.original_model.config.layer_types
    assert layer_types[3] == "sliding_attention" and layer_types[5] == "full_attention"
    _check_real(model, [3, 11])
