"""The ``--out`` policy: a run writes a new or empty folder, or replaces, as a whole, a folder
sinkscope wrote before; it never mixes two runs' files, never deletes a file it did not write,
and leaves nothing behind when it fails, is interrupted (Ctrl-C, SIGTERM) or is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from circuits.output import MANIFEST, atomic_output_dir, file_digest, sweep_stale
from helpers import ROOT, expect_bad_out, hanging_measure
from sinkscope.cli import main

TINY = ["--model", "tiny-llama"]
LAB = ["--corpus", "builtin", "--steps", "1"]
#: Every subcommand that writes an --out, with arguments that would otherwise start real work.
WRITERS = {
    "measure": ["measure", *TINY, "--text", "a b c d"],
    "demo": ["demo", *TINY, "--n", "2"],
    "intervene": ["intervene", *TINY, "--text", "a b c d e", "--intervention", "ablate-mlp:layers=1"],
    "reproduce": ["reproduce", *TINY, "--size", "ci"],
    "pretrain": ["pretrain", "--variant", "softmax", *LAB],
    "lab-compare": ["lab-compare", *LAB],
}


def _whole(out: Path) -> dict:
    """The manifest of ``out``, after checking that it lists exactly the files there, unchanged."""
    manifest = json.loads((out / MANIFEST).read_text())
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert present == set(manifest["files"])
    for name, info in manifest["files"].items():
        assert file_digest(out / name) == info["sha256"], name
    return manifest


# --------------------------------------------------------------------------- unusable --out


@pytest.mark.parametrize("command", WRITERS)
def test_out_at_an_existing_file(tmp_path, capsys, command):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert "is an existing file" in expect_bad_out(capsys, WRITERS[command], target)
    assert target.read_text() == "mine"


@pytest.mark.parametrize("command", WRITERS)
def test_out_under_a_file(tmp_path, capsys, command):
    (tmp_path / "file").write_text("mine")
    msg = expect_bad_out(capsys, WRITERS[command], tmp_path / "file" / "out")
    assert "is a file, so no folder can be made under it" in msg


@pytest.mark.parametrize("command", WRITERS)
def test_out_in_an_unwritable_place(capsys, command):
    assert "cannot write under /proc" in expect_bad_out(capsys, WRITERS[command], Path("/proc/x"))


@pytest.mark.parametrize("command", ["measure", "pretrain", "lab-compare"])
def test_a_folder_with_a_users_file_is_refused_and_the_file_kept(tmp_path, capsys, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text("my own notes\n")
    msg = expect_bad_out(capsys, WRITERS[command], out)
    assert "non-empty folder sinkscope did not write" in msg
    assert [p.name for p in out.iterdir()] == ["log.jsonl"] and (out / "log.jsonl").read_text() == "my own notes\n"


# --------------------------------------------------------------------------- replacing an earlier result


def test_a_rerun_replaces_sinkscopes_own_folder_as_a_whole(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["intervene", *TINY, "--intervention", "amplify-variance:layer=1,positions=3,factor=2", "--text", "a b c d e",
            "f g h i j", "--n-resamples", "50", "--out", str(out)]
    assert main([*args, "--strengths", "1", "2"]) == 0
    assert (out / "dose_response.png").is_file() and (out / "sweep" / "sweep.csv").is_file()
    assert main(args) == 0
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert names == {MANIFEST, "effect.json", "sink_delta_heatmap.png", "view.html"}, "no stale file of the first run may stay"
    _whole(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_users_file_in_a_sinkscope_folder_stops_the_rerun(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["measure", *TINY, "--text", "a b c d", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    msg = expect_bad_out(capsys, ["measure", *TINY, "--text", "a b c d"], out)
    assert "holds files sinkscope did not write (notes.txt)" in msg
    assert (out / "notes.txt").read_text() == "mine" and (out / "sinks.json").is_file()


def test_two_processes_writing_one_out_end_with_one_whole_result(tmp_path):
    """The swap into --out runs under a lock on its parent. The first run to swap holds it until
    the other is seen blocked on that lock (/proc/locks; at most 120 s, else it exits 3: no
    overlap), so the two provably overlapped; both succeed and the folder is exactly one of them."""
    out = tmp_path / "out"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        import circuits.output as output
        from helpers import waiters_on
        real, barrier = output.os.replace, Path(sys.argv[3])
        def at_the_same_time(a, b):
            output.os.replace = real
            deadline = time.monotonic() + 120
            while not (seen := waiters_on(Path(b).parent)):
                if list(barrier.iterdir()):  # the other one has swapped: this one waited for it
                    return real(a, b)
                if time.monotonic() > deadline:
                    sys.exit(3)
                time.sleep(0.02)
            (barrier / str(seen[0])).touch()  # the run seen waiting
            return real(a, b)
        output.os.replace = at_the_same_time
        from sinkscope.cli import main
        sys.exit(main(["measure", "--model", "tiny-llama", "--text", sys.argv[1], "--out", sys.argv[2]]))
    """)
    texts = ["the first run's only text", "the second run writes this"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    procs = [subprocess.Popen([sys.executable, "-c", script, text, str(out), str(barrier)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for text in texts]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results  # 3: one never saw the other at its swap
    waited = [int(p.name) for p in barrier.iterdir()]
    assert len(waited) == 1 and waited[0] in {p.pid for p in procs}, "one run was seen waiting for the other's swap"
    _whole(out)
    doc = json.loads((out / "sinks.json").read_text())
    assert "".join(doc["tokens"][0]) in texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier", "out"]


# --------------------------------------------------------------------------- interrupted, terminated, killed


def test_sigterm_removes_the_staging_folder(tmp_path):
    proc = hanging_measure(tmp_path / "out")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def test_the_staging_folder_of_a_sigkilled_run_is_swept_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "out"
    proc = hanging_measure(out)
    proc.kill()
    proc.communicate(timeout=60)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.staging-")], "SIGKILL runs no handler"
    assert main(["measure", *TINY, "--text", "a b c d", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staging_left_by_a_killed_run_is_swept_by_the_next(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    stale = tmp_path / f".out.staging-{dead}-abc123"
    stale.mkdir()
    (stale / "sinks.json").write_text("half")
    live = tmp_path / f".out.staging-{os.getppid()}-def456"  # a running process' staging stays
    live.mkdir()
    with atomic_output_dir(out) as folder:
        (folder / "x.txt").write_text("new")
    assert not stale.exists() and live.exists()
    assert (out / "x.txt").read_text() == "new"


def test_a_swap_killed_halfway_puts_the_previous_result_back(tmp_path):
    out = tmp_path / "out"
    moved = tmp_path / f".out.old-{_dead_pid()}-abc123"
    (moved / "previous").mkdir(parents=True)
    (moved / "previous" / "sinks.json").write_text("old result")
    assert sweep_stale(out) == [moved]
    assert (out / "sinks.json").read_text() == "old result" and not moved.exists()


# --------------------------------------------------------------------------- a resumable dose response


def test_intervene_strengths_keeps_finished_items_when_interrupted_and_resumes(tmp_path, capsys, monkeypatch):
    import interventions.sweep as sweep_mod

    out = tmp_path / "out"
    args = ["intervene", *TINY, "--intervention", "amplify-variance:layer=1,positions=3,factor=2",
            "--strengths", "0.5", "1", "2", "4", "--text", "a b c d e f", "g h i j k l", "--n-resamples", "0",
            "--out", str(out)]
    real = sweep_mod._write_atomic
    written = []

    def interrupt_after_two(frame, path, fmt):
        if path.parent.name == "items" and len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        return real(frame, path, fmt)

    monkeypatch.setattr(sweep_mod, "_write_atomic", interrupt_after_two)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "2 of 4 finished sweep items are kept" in err and "run the same command again to resume" in err
    assert not out.exists()

    monkeypatch.setattr(sweep_mod, "_write_atomic", lambda frame, path, fmt: (written.append(path), real(frame, path, fmt)))
    written.clear()
    assert main(args) == 0
    assert len([p for p in written if p.parent.name == "items"]) == 2, "only the two unfinished items run again"
    doc = json.loads((out / "effect.json").read_text())
    assert [r["iv_strength"] for r in doc["dose_response"] if r["metric"] == "target_sink_score"] == [0.5, 1, 2, 4]
    assert len(list((out / "sweep" / "items").iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _whole(out)
