"""Models a user can name that still go wrong: an inconsistent config, weights that give NaN, a
hub id without a network, and the packaged-model cache (checked against the fingerprints
recorded when it was built, rebuilt when damaged, built once when two processes want it,
swept of a killed build's leftovers).

The cache tests use a stand-in packaged model, ``fake-tiny``: a seeded tiny Llama written by the
real cache writer (:func:`circuits.models._write_cache`) under a temporary ``XDG_CACHE_HOME``,
so they exercise the real verification, locking and rebuild paths in seconds and never touch
the real caches in ``~/.cache/sinkscope``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from circuits import hub, model_cache, models
from helpers import ROOT, expect_bad_input, waiters_on

FAKE = models.PackagedModel(name="fake-tiny", hub_id="sinkscope/fake-tiny", package="fake", pip_name="fake",
                            description="a stand-in packaged model", native_bos=False, locate_gguf=lambda cache: cache)


def install_fake(monkeypatch, cache_home, *, nan: bool = False, delay: float = 0.0, log=None, await_waiter: bool = False) -> list[int]:
    """Register ``fake-tiny`` with a builder that counts its builds (and appends to ``log``).

    ``await_waiter``: the build does not finish until another process is seen blocked on the
    cache root's lock (at most 120 s; then it writes ``no waiter`` to ``log``), so two processes
    provably overlap instead of probably."""
    builds: list[int] = []

    def build(spec, target):
        # heavy: transformers is imported by the build it stands in for
        from transformers import AutoModelForCausalLM

        builds.append(1)
        if log is not None:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        if await_waiter:
            deadline = time.monotonic() + 120
            while not (seen := waiters_on(Path(target).parent)) and time.monotonic() < deadline:
                time.sleep(0.05)
            with open(log, "a") as f:
                f.write(f"waiter {seen[0]}\n" if seen else "no waiter\n")
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(models.tiny_hf_config("llama"))
        if nan:
            with torch.no_grad():
                hf.model.norm.weight.fill_(float("nan"))
        models._write_cache(hf, models.byte_tokenizer(), target, {"hub_id": spec.hub_id})

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.setitem(models.PACKAGED, FAKE.name, FAKE)
    monkeypatch.setattr(model_cache, "_dequantize_to_cache", build)
    return builds


@pytest.fixture
def fake(monkeypatch, tmp_path):
    builds = install_fake(monkeypatch, tmp_path / "cache")
    return builds, tmp_path / "cache" / "sinkscope" / "models" / FAKE.name


def _tokens():
    return torch.tensor([[1, 2, 3, 4, 5]])


def test_the_cache_is_built_once_then_reused(fake):
    builds, folder = fake
    first = models.load_model(FAKE.name)
    assert builds == [1]
    info = json.loads((folder / "COMPLETE").read_text())
    assert set(info["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert info["files"]["model.safetensors"]["bytes"] == (folder / "model.safetensors").stat().st_size
    second = models.load_model(FAKE.name)
    assert builds == [1]
    with torch.no_grad():
        assert torch.equal(first(_tokens()), second(_tokens()))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_cached_safetensors_is_detected_and_rebuilt(fake, caplog, damage):
    builds, folder = fake
    with torch.no_grad():
        reference = models.load_model(FAKE.name)(_tokens())
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    damaged = folder / "damaged"  # written aside and renamed: the loaded model still maps the old file
    if damage == "truncate":
        damaged.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # same size, one byte changed in the middle of the tensors
        damaged.write_bytes(data)
    if damage == "delete":
        weights.unlink()
    else:
        os.replace(damaged, weights)
    assert models._cache_problem(folder) is not None
    rebuilt = models.load_model(FAKE.name)
    assert builds == [1, 1]
    assert "unusable" in caplog.text and "rebuilding it" in caplog.text
    with torch.no_grad():
        assert torch.equal(rebuilt(_tokens()), reference)


def test_a_cache_from_an_earlier_sinkscope_gets_its_fingerprints_recorded(fake):
    builds, folder = fake
    models.load_model(FAKE.name)
    info = json.loads((folder / "COMPLETE").read_text())
    del info["files"]
    (folder / "COMPLETE").write_text(json.dumps(info))
    models.load_model(FAKE.name)
    assert builds == [1]
    assert "model.safetensors" in json.loads((folder / "COMPLETE").read_text())["files"]


def test_a_killed_builds_leftovers_are_swept(fake):
    builds, folder = fake
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    folder.parent.mkdir(parents=True)
    stale = folder.parent / f".{FAKE.name}.staging-{proc.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # half-built: no COMPLETE marker
    models.load_model(FAKE.name)
    assert builds == [1] and not stale.exists() and (folder / "COMPLETE").is_file()


def test_two_processes_building_one_cache_build_it_once(tmp_path):
    """The second process waits for the first one's build (a lock), then uses that cache. The
    build does not end until the other process is seen blocked on the lock (/proc/locks), so
    the two provably overlapped; the log names the waiter."""
    log = tmp_path / "builds.log"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import pytest
        import test_cli_models as t
        from circuits import models
        with pytest.MonkeyPatch.context() as mp:
            t.install_fake(mp, {str(tmp_path / 'cache')!r}, log={str(log)!r}, await_waiter=True)
            bridge = models.load_model("fake-tiny")
            print("loaded", bridge.cfg.n_layers)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(out.strip() == "loaded 4" for out, _ in results)
    builder, waited = log.read_text().splitlines()
    assert waited.startswith("waiter "), "the second process never waited on the lock: no overlap"
    assert {int(builder), int(waited.split()[1])} == {p.pid for p in procs}, "built exactly once, by one, while the other waited"


def test_weights_that_give_non_finite_activations_are_refused(monkeypatch, tmp_path, capsys):
    builds = install_fake(monkeypatch, tmp_path / "cache", nan=True)
    with pytest.raises(models.NonFiniteModelError, match="non-finite"):
        models.load_model(FAKE.name)
    assert builds == [1, 1], "rebuilt once, then refused"
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", FAKE.name, "--text", "a b c"])
    assert "non-finite (NaN or infinite) activations" in msg


# --------------------------------------------------------------------------- local folders and hub ids


def _tiny_folder(path, arch: str, edit=None, nan: bool = False):
    # heavy: transformers is only needed to write the folder
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(models.tiny_hf_config(arch))
    if nan:
        with torch.no_grad():
            next(hf.parameters()).fill_(float("inf"))
    hf.save_pretrained(path)
    models.byte_tokenizer().save_pretrained(path)
    if edit:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **edit}))
    return path


def test_a_gpt2_config_with_a_key_value_head_count_is_one_clear_line(tmp_path, capsys):
    folder = _tiny_folder(tmp_path / "gpt2-kv", "gpt2", edit={"num_key_value_heads": 2})
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", str(folder), "--text", "a b c"])
    assert "config is inconsistent" in msg and "n_key_value_heads 2" in msg


def test_a_local_folder_with_infinite_weights_is_refused(tmp_path, capsys):
    folder = _tiny_folder(tmp_path / "inf", "llama", nan=True)
    assert "non-finite" in expect_bad_input(capsys, tmp_path, ["measure", "--model", str(folder), "--text", "a b c"])


def test_a_hub_id_without_a_slash_tries_the_local_cache_then_says_the_hub_is_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "gpt2", "--text", "a b c"])
    assert "'gpt2'" in msg and "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=3.0: False)
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "smolm2-135m", "--text", "a b c"])
    assert "unknown model 'smolm2-135m' (did you mean 'smollm2-135m'?)" in msg and "cannot be reached" in msg


def test_a_silent_hub_is_given_up_after_the_stated_timeout_not_retried(monkeypatch):
    """A network that accepts the connection and then says nothing (a black hole, here a
    loopback server that never answers the TLS handshake): the hub check makes one request
    with its own timeout and reports the hub unreachable, instead of transformers' minute of
    retries. Proved by the request seen, not by the seconds it took on this machine."""
    import socket
    import threading
    import urllib.request

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    seen = []
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda req, timeout: seen.append((req.full_url, timeout)) or real(req, timeout=timeout))
    port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{port}")
    try:
        assert hub._hub_reachable(timeout=0.5) is False
    finally:
        server.close()
    assert seen == [(f"https://127.0.0.1:{port}/api/models?limit=1", 0.5)], "one request, with the stated timeout"
    assert held, "the server accepted the connection: the request waited on a silent peer"
