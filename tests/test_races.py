"""Two runs at once, runs killed or interrupted twice, and an --out a user changed.

Every concurrency test proves that the two runs overlapped: either the test process holds the
folder's lock itself while the second run starts, or the first run (a subprocess) announces
that it is inside its work and is kept there until the second one has answered.

The policy (docs/command.md, "--out"): a training run, a lab comparison and a resumable sweep
have their folder to themselves (:func:`circuits.output.exclusive`; a second run is refused with
one line naming the first one's process); staging folders of dead runs are swept next to any
--out written; a first Ctrl-C (or SIGTERM, SIGHUP) unwinds and cleans up, later ones wait for
the clean-up, and the exit code is 130; an --out that is not as sinkscope wrote it is refused,
naming what changed, never deleted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from circuits.output import MANIFEST, FolderBusyError, exclusive, lock_holder
from helpers import ROOT, expect_bad_out, hanging_measure
from sinkscope.cli import build_parser, main

TINY = ["--model", "tiny-llama"]
SWEEP = ["intervene", *TINY, "--intervention", "amplify-variance:layer=1,positions=3,factor=2", "--strengths", "1", "2", "4", "8",
         "--text", "a b c d e f", "g h i j k l", "--n-resamples", "0"]


@contextmanager
def held_elsewhere(folder: Path):
    """Another process holds ``folder`` (:func:`circuits.output.exclusive`) until the block ends;
    yields its process id. (A hold nests within one process, so the holder must be another.)"""
    script = "import sys\nfrom circuits.output import exclusive\nwith exclusive(sys.argv[1], 'x'):\n" \
             "    print('held', flush=True)\n    sys.stdin.read()\n"
    proc = subprocess.Popen([sys.executable, "-c", script, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    try:
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def _popen(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _sweep_folder(argv: list[str]) -> Path:
    """The resumable sweep folder the command would use, computed as the command computes it."""
    from circuits.models import load_model
    from circuits.probes import tokenize
    from interventions.registry import parse_spec
    from sinkscope.cli import _sweep_partial

    args = build_parser().parse_args(argv)
    batch = tokenize(load_model(args.model), args.text, prepend_bos=args.prepend_bos, max_tokens=args.max_tokens)
    settings = dict(eps=args.eps, batch_size=args.batch_size, n_resamples=args.n_resamples, seed=args.seed)
    return _sweep_partial(args, batch, parse_spec(args.intervention), list(args.strengths), settings)


# --------------------------------------------------------------------------- the folder lock itself


def test_exclusive_refuses_a_second_holder_and_names_the_first(tmp_path):
    folder = tmp_path / "run"
    with held_elsewhere(folder) as pid:
        assert lock_holder(folder) == pid
        with pytest.raises(FolderBusyError, match=f"the run folder {folder} is in use by another sinkscope run \\(process {pid}\\)"):
            with exclusive(folder, "the run folder"):
                pass
    with exclusive(folder, "the run folder"):  # released when its holder ended
        assert lock_holder(folder) == os.getpid()
        with exclusive(folder, "the run folder"):  # a hold nests within one process
            pass
        assert lock_holder(folder) == os.getpid(), "the outer hold outlives the nested one"
    assert lock_holder(folder) is None


def test_a_folder_moved_away_while_held_is_not_the_one_locked(tmp_path):
    """The first run moves its sweep folder into its result while holding it: a second run then
    gets a new folder of that name, not the moved one."""
    folder = tmp_path / "partial"
    with held_elsewhere(folder):
        folder.rename(tmp_path / "moved")
        with exclusive(folder, "x") as again:
            assert again == folder and folder.is_dir()
            assert os.stat(folder).st_ino != os.stat(tmp_path / "moved").st_ino


# --------------------------------------------------------------------------- one sweep, two runs


def test_the_same_sweep_while_one_runs_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "E"
    argv = [*SWEEP, "--out", str(out)]
    partial = _sweep_folder(argv)
    with held_elsewhere(partial) as pid:  # the first run, inside its sweep
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert f"--out {out}: the same sweep's folder {partial} is in use by another sinkscope run (process {pid})" in err[0]
        assert not out.exists() and partial.is_dir()
    assert main(argv) == 0, "free again: the run goes ahead"
    assert (out / "sweep" / "sweep.csv").is_file() and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E"]


def test_two_identical_sweep_commands_a_moment_apart(tmp_path):
    """The first process announces each finished item and waits; the second starts while the
    first is inside its sweep, is refused in one line naming it; the first then completes."""
    out = tmp_path / "E"
    go = tmp_path / "go"
    first = _popen("""
        import sys, time
        from pathlib import Path
        import interventions.sweep as sweep_mod
        real = sweep_mod._write_atomic
        def announce(frame, path, fmt):
            result = real(frame, path, fmt)
            if path.parent.name == "items":
                print("item", flush=True)
                while not Path(sys.argv[1]).exists():
                    time.sleep(0.05)
            return result
        sweep_mod._write_atomic = announce
        from sinkscope.cli import main
        sys.exit(main(sys.argv[2:]))
    """, str(go), *SWEEP, "--out", str(out))
    assert first.stdout.readline().strip() == "item", first.stderr.read()
    second = subprocess.run([sys.executable, "-m", "sinkscope.cli", *SWEEP, "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert first.poll() is None, "the first run was still inside its sweep when the second answered"
    go.touch()
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert f"is in use by another sinkscope run (process {first.pid})" in second.stderr
    strengths = [r["iv_strength"] for r in json.loads((out / "effect.json").read_text())["dose_response"]
                 if r["metric"] == "target_sink_score"]
    assert strengths == [1, 2, 4, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["E", "go"]


def test_a_refused_or_failed_sweep_leaves_no_empty_sweep_folder(tmp_path, capsys):
    out = tmp_path / "E"
    # position 2 is the last of 3 tokens: refused after the sweep folder was taken, before any forward
    argv = ["intervene", *TINY, "--intervention", "amplify-variance:layer=1,positions=2,factor=2", "--strengths", "1", "2",
            "--max-tokens", "3", "--text", "a b c d e f", "g h i j k l", "--n-resamples", "0", "--out", str(out)]
    assert main(argv) == 2
    assert "have no later token" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- one training run per folder


LAB = ["--variant", "softmax", "--steps", "2", "--corpus", "builtin", "--eval-every", "1", "--val-windows", "2",
       "--sink-sequences", "2", "--sink-tokens", "8", "--n-ctx", "16", "--d-model", "16", "--d-mlp", "32", "--n-heads", "2",
       "--n-layers", "1", "--batch-size", "2"]


def test_a_second_pretrain_into_a_busy_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with held_elsewhere(out) as pid:  # the first run, training
        msg = expect_bad_out(capsys, ["pretrain", *LAB], out)
        assert msg == (f"sinkscope: error: the run folder {out} is in use by another sinkscope run (process {pid}); "
                       "wait for it to finish, or choose another folder")
        assert list(out.iterdir()) == [], "the second run wrote nothing into it"
    assert main(["pretrain", *LAB, "--out", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2], "one run's log, in order"


def test_two_pretrain_processes_into_one_folder(tmp_path):
    """The first announces its first record and waits; the second is refused meanwhile."""
    out = tmp_path / "run"
    go = tmp_path / "go"
    first = _popen("""
        import sys, time
        from pathlib import Path
        import sinkscope.lab.train as train
        real = train._append_jsonl
        def announce(path, record):
            real(path, record)
            print("step", record["step"], flush=True)
            while not Path(sys.argv[1]).exists():
                time.sleep(0.05)
        train._append_jsonl = announce
        from sinkscope.cli import main
        sys.exit(main(sys.argv[2:]))
    """, str(go), "pretrain", *LAB, "--out", str(out))
    assert first.stdout.readline().strip() == "step 0", first.stderr.read()
    second = subprocess.run([sys.executable, "-m", "sinkscope.cli", "pretrain", *LAB, "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert first.poll() is None
    go.touch()
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and f"in use by another sinkscope run (process {first.pid})" in second.stderr
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_the_library_trainer_holds_its_folder_too(tmp_path):
    from sinkscope.lab.train import TrainConfig, train

    out = tmp_path / "run"
    with held_elsewhere(out):
        with pytest.raises(FolderBusyError, match="the run folder"):
            train(TrainConfig(steps=1, corpus="builtin"), out)


def test_the_library_sweep_holds_its_store_before_any_forward(tmp_path, llama):
    from helpers import forward_counter
    from interventions.sweep import sweep

    store = tmp_path / "store"
    with held_elsewhere(store) as pid, forward_counter(llama) as calls:
        with pytest.raises(FolderBusyError, match=f"the sweep folder {store} is in use by another sinkscope run \\(process {pid}\\)"):
            sweep(llama, ["a b c d e f", "g h i j k l"], "amplify-variance:layer=1,positions=3,factor={f}", {"f": [1.0, 2.0]},
                  store, format="csv", progress=False)
    assert calls == []


def test_a_second_lab_compare_into_a_busy_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    with held_elsewhere(out) as pid:
        msg = expect_bad_out(capsys, ["lab-compare", "--corpus", "builtin", "--steps", "1"], out)
        assert f"the comparison folder {out} is in use by another sinkscope run (process {pid})" in msg
        assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- stale staging, signals


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_dead_run_is_swept_next_to_any_out(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".a.staging-{dead}-xyz"
    (stale / "half").mkdir(parents=True)
    moved = tmp_path / f".c.old-{dead}-xyz"  # a swap into c killed halfway: c's previous result put back
    (moved / "previous").mkdir(parents=True)
    (moved / "previous" / "sinks.json").write_text("c's result")
    live = tmp_path / f".a.staging-{os.getppid()}-xyz"
    live.mkdir()
    assert main(["measure", *TINY, "--text", "a b c d", "--out", str(tmp_path / "b")]) == 0
    assert not stale.exists() and not moved.exists() and live.exists()
    assert (tmp_path / "c" / "sinks.json").read_text() == "c's result"


def test_sighup_cleans_up_like_sigterm(tmp_path):
    proc = hanging_measure(tmp_path / "out")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "sinkscope: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_a_second_ctrl_c_during_the_clean_up_still_exits_130_with_nothing_left(tmp_path):
    proc = hanging_measure(tmp_path / "out", slow_cleanup=True)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "cleaning"  # the second one lands inside the clean-up
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["sinkscope: interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == [], "the clean-up ran to its end"


# --------------------------------------------------------------------------- an --out the user changed


@pytest.fixture
def written(tmp_path):
    out = tmp_path / "out"
    assert main(["measure", *TINY, "--text", "a b c d", "--out", str(out)]) == 0
    return out


def _refused(capsys, out: Path) -> str:
    before = sorted((p.relative_to(out).as_posix(), p.is_symlink()) for p in out.rglob("*"))
    msg = expect_bad_out(capsys, ["measure", *TINY, "--text", "a b c d"], out)
    assert sorted((p.relative_to(out).as_posix(), p.is_symlink()) for p in out.rglob("*")) == before, "nothing deleted"
    return msg


def test_an_edited_file_in_an_earlier_result_is_named_and_kept(written, capsys):
    doc = written / "sinks.json"
    doc.write_text(doc.read_text().replace('"schema"', '"schema" ', 1))  # one space added by hand
    msg = _refused(capsys, written)
    assert "holds a file changed since sinkscope wrote it (sinks.json)" in msg
    assert '"schema" ' in doc.read_text()


def test_an_added_empty_folder_is_named_and_kept(written, capsys):
    (written / "my-notes").mkdir()
    assert "holds a folder sinkscope did not make (my-notes)" in _refused(capsys, written)


def test_a_symlink_is_named_and_neither_it_nor_its_target_is_deleted(written, capsys, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("keep me")
    (written / "link").symlink_to(target, target_is_directory=True)
    assert "holds a symlink (link)" in _refused(capsys, written)
    assert (written / "link").is_symlink() and (target / "data.txt").read_text() == "keep me"


def test_an_unchanged_earlier_result_is_still_replaced(written, capsys):
    first = json.loads((written / MANIFEST).read_text())
    assert main(["measure", *TINY, "--text", "e f g h", "--out", str(written)]) == 0
    assert json.loads((written / MANIFEST).read_text())["files"]["sinks.json"] != first["files"]["sinks.json"]


@pytest.mark.parametrize("where", [".", ".."])
def test_out_at_the_current_folder_or_above_is_refused(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    code = main(["measure", *TINY, "--text", "a b c d", "--out", where])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--out {where} is the current folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"] and list((tmp_path / "sub").iterdir()) == []
