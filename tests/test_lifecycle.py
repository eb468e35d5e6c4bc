"""Runs that never lose work: private Rays, checkpoints, --resume, clean stops, non-finite values, write failures.

Every run here is the real CLI in a subprocess, as a user starts it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.files import RecordFile

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420
SMALL = ["--dataset", "digits", "--model", "mlp", "--threads", "1"]
# long enough (mnist5k, LeNet) that a signal sent at start lands before the end, synchronous rounds (lead 0)
# so that adoption does not depend on timing; a pool per round, so a resumed run must draw the same pools
SYNC = ["--dataset", "mnist5k", "--model", "lenet", "--epochs", "24", "--select-every", "3", "--lead", "0",
        "--budget", "0.1", "--pool", "0.5", "--threads", "1", "--seed", "3", "--checkpoint-every", "2"]


def cli(*args, address=None, **popen):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.Popen([sys.executable, "-m", "trainer.run", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(process) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=TIMEOUT_S)
    return process.returncode, out, err


def wait_for(path: Path, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_runs_side_by_side_each_start_their_own_ray(tmp_path):
    runs = [cli(*SMALL, "--epochs", "6", "--select-every", "2", "--out", str(tmp_path / name)) for name in "ab"]
    results = [finish(p) for p in runs]
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    addresses = {summary(tmp_path / name)["ray_address"] for name in "ab"}
    assert len(addresses) == 2  # each on a private Ray, neither joined the other's
    # the default adoption is deterministic: the same seed gives the same subsets, losses and accuracy, even with
    # two runs competing for the cores (rounds are computed at a fixed epoch and waited for at their boundary)
    a, b = (summary(tmp_path / name) for name in "ab")
    assert a["rounds"] >= 2 and a["acc"] == b["acc"] and a["rounds_harmful"] == 0
    keys = ("round", "status", "trigger_epoch", "adopted_epoch", "subset_size", "grad_error", "n_padded")
    assert [{k: r[k] for k in keys} for r in lines(tmp_path / "a" / "rounds.jsonl")] == \
        [{k: r[k] for k in keys} for r in lines(tmp_path / "b" / "rounds.jsonl")]
    assert [e["loss"] for e in lines(tmp_path / "a" / "epochs.jsonl")] == \
        [e["loss"] for e in lines(tmp_path / "b" / "epochs.jsonl")]


def test_sigint_then_resume_equals_an_uninterrupted_run(ray_address, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = cli(*SYNC, "--out", str(whole), address=ray_address)
    interrupted = cli(*SYNC, "--out", str(cut), address=ray_address)
    wait_for(cut / "config.json")
    interrupted.send_signal(signal.SIGINT)
    code, _, err = finish(interrupted)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "--resume" in err
    first = summary(cut)
    assert first["status"] == "interrupted" and first["epochs_run"] < 13 and (cut / "checkpoint.pt").exists()
    # honoured at the end of the epoch in which the request reached the trainer, never later
    arrived, stopped = map(int, re.search(r"during epoch (\d+); stopped at the end of epoch (\d+)",
                                          first["reason"]).groups())
    assert arrived == stopped == first["epochs_run"] - 1, first["reason"]
    code, _, err = finish(cli("--resume", str(cut), address=ray_address))
    assert code == 0, err[-3000:]
    assert finish(reference)[0] == 0
    done, expected = summary(cut), summary(whole)
    assert done["status"] == "completed" and done["epochs_run"] == expected["epochs_run"] == 13  # round(12 * 0.1) = 1 full + 12 subset
    assert done["acc"] == expected["acc"]
    keys = ("round", "status", "subset_size", "grad_error", "n_ground")
    assert [{k: r[k] for k in keys} for r in lines(cut / "rounds.jsonl")] == \
        [{k: r[k] for k in keys} for r in lines(whole / "rounds.jsonl")]
    assert [e["loss"] for e in lines(cut / "epochs.jsonl")] == [e["loss"] for e in lines(whole / "epochs.jsonl")]
    assert {r["n_ground"] for r in lines(whole / "rounds.jsonl")} == {55}  # half of the 110 mini-batches


def test_sigkill_then_resume_finishes_and_model_pt_reproduces_the_accuracy(ray_address, tmp_path):
    out = tmp_path / "run"
    process = cli(*SYNC, "--out", str(out), address=ray_address)
    wait_for(out / "checkpoint.pt")
    process.kill()
    process.wait(timeout=60)
    assert not (out / "summary.json").exists()
    code, stdout, err = finish(cli("--resume", str(out), address=ray_address))
    assert code == 0, err[-3000:]
    result = summary(out)
    assert result["status"] == "completed" and result["epochs_run"] == 13
    # the trained model, loaded as a user would, gives the reported test accuracy
    from protocol.config import RunConfig
    from trainer.builtin.models import build_model
    from trainer.builtin.training import evaluate
    from trainer.data.splits import load_splits

    config = RunConfig.model_validate_json((out / "config.json").read_text())
    splits = load_splits(config.data, config.seed)
    model = build_model(config.model.name, splits.in_shape, splits.n_classes)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert evaluate(model, splits.test_x, splits.test_y) == result["acc"]
    assert "--resume" not in stdout and "model.pt" in stdout


def test_a_diverging_run_fails_clearly(ray_address, tmp_path):
    out = tmp_path / "run"
    code, _, err = finish(cli(*SMALL, "--epochs", "6", "--select-every", "2", "--lr", "1e6", "--out", str(out),
                              address=ray_address))
    assert code == 1, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "training loss became" in line[0] and "--lr" in line[0], err[-2000:]
    result = summary(out)
    assert result["status"] == "failed" and "training loss became" in result["reason"]
    def strict(text):  # NaN and Infinity are not JSON: no file of the run may hold them
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))

    strict((out / "summary.json").read_text())
    for line in (out / "epochs.jsonl").read_text().splitlines():
        assert all(value == value for value in strict(line).values() if isinstance(value, float))


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    from trainer.launch.run import main

    assert main(["--resume", str(tmp_path)]) == 2
    assert "no checkpoint.pt there" in capsys.readouterr().err
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "summary.json").write_text('{"status": "completed"}')
    assert main(["--resume", str(tmp_path)]) == 2
    assert "already completed" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path), "--epochs", "3"]) == 2
    assert "drop the other flags" in capsys.readouterr().err


def test_resume_imports_no_factory_the_user_did_not_name_again(tmp_path, capsys):
    """A run directory is data: a factory its config.json names runs only when the user names it again."""
    from protocol.config import RunConfig
    from trainer.run import main

    planted = tmp_path / "planted.py"
    planted.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('code ran')\ndef make(s, c):\n    raise SystemExit\n")
    config = RunConfig.model_validate({"model": {"name": "planted:make"}})
    (tmp_path / "config.json").write_text(config.model_dump_json())
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["--resume", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "names the factory 'planted:make' (--model)" in err and "pass --model planted:make again" in err, err
        assert main(["--resume", str(tmp_path), "--model", "other:make"]) == 2
        assert "--model 'other:make' differs from the run's 'planted:make'" in capsys.readouterr().err
        # named again: trusted, and the next check (the checkpoint) speaks
        assert main(["--resume", str(tmp_path), "--model", "planted:make"]) == 2
        assert "checkpoint.pt" in capsys.readouterr().err
    finally:
        sys.path.remove(str(tmp_path))
    assert not (tmp_path / "ran").exists()  # nothing from the directory was imported


def test_record_files_refuse_a_planted_symlink_and_temporary_names_are_unpredictable(tmp_path):
    from protocol.errors import RunFailed
    from trainer.files import atomic_write, temporary_path

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / "epochs.jsonl").symlink_to(target)
    with pytest.raises(RunFailed, match="cannot write .*epochs.jsonl"):
        RecordFile(tmp_path / "epochs.jsonl")
    assert target.read_text() == "keep me"
    names = {temporary_path(tmp_path / "summary.json").name for _ in range(3)}
    assert len(names) == 3 and all(n.startswith(".summary.json.") for n in names)
    atomic_write(tmp_path / "summary.json", lambda tmp: tmp.write_text("{}"))
    assert (tmp_path / "summary.json").read_text() == "{}"


def test_a_full_disk_leaves_whole_records_and_one_line(tmp_path):
    from protocol.errors import RunFailed

    records = RecordFile(Path("/dev/full"))
    with pytest.raises(RunFailed, match="cannot write /dev/full: No space left on device"):
        records.append([{"epoch": 0, "loss": 1.0}])
    records.close()
    path = tmp_path / "epochs.jsonl"
    good = RecordFile(path)
    good.append([{"epoch": 0}, {"epoch": 1}])
    good.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"epoch": 0}, {"epoch": 1}]


def test_run_directory_removed_mid_run_is_one_line(ray_address, tmp_path):
    import shutil

    out = tmp_path / "run"
    process = cli(*SMALL, "--epochs", "60", "--select-every", "5", "--checkpoint-every", "1", "--kappa", "0",
                  "--budget", "0.5", "--out", str(out), address=ray_address)
    wait_for(out / "checkpoint.pt")
    shutil.rmtree(out)
    code, _, err = finish(process)
    assert code == 1, err[-3000:]
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and str(out) in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_sigkill_of_a_driver_leaves_none_of_its_private_ray_behind(tmp_path):
    """The private Ray a run starts goes with it: Ray starts its processes fate-shared with the driver."""
    out = tmp_path / "run"
    process = cli(*SYNC, "--out", str(out))
    session = None
    end = time.monotonic() + 120
    while session is None:
        assert time.monotonic() < end, "the run never started its Ray"
        names = subprocess.run(["ps", "-ww", "-eo", "cmd"], capture_output=True, text=True).stdout  # -ww: whole lines
        mark = f"_{process.pid}/"  # the session folder ends with the pid of the process that started it
        session = next((word.split("/")[3] for line in names.splitlines() for word in line.split()
                        if "/tmp/ray/session_" in word and mark in word), None)
        time.sleep(0.2)
    wait_for(out / "checkpoint.pt")
    process.kill()
    process.wait(timeout=60)
    end = time.monotonic() + 30
    while True:
        left = [line for line in subprocess.run(["ps", "-ww", "-eo", "pid,cmd"], capture_output=True, text=True)
                .stdout.splitlines() if session in line]
        if not left or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert not left, left


def test_resume_checks_the_checkpoint_before_it_replaces_a_record(ray_address, tmp_path, capsys):
    """A checkpoint loads as tensors and plain types only; one that does not read, or that was written with
    another config than config.json, is one line naming the file or the fields, and the records stay as they
    were."""
    from trainer.launch.run import main

    out = tmp_path / "run"
    # lead 1 and a checkpoint every epoch: some checkpoints hold a round still out, with its answer
    code, _, err = finish(cli(*SMALL, "--epochs", "6", "--select-every", "2", "--lead", "1", "--checkpoint-every", "1",
                              "--out", str(out), address=ray_address))
    assert code == 0, err[-3000:]
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # no pickled code, no numpy objects
    assert state["config"] == json.loads((out / "config.json").read_text())
    (out / "summary.json").write_text('{"status": "interrupted"}')
    records = {name: (out / name).read_bytes() for name in ("epochs.jsonl", "rounds.jsonl")}

    config = json.loads((out / "config.json").read_text())
    changed = {**config, "seed": 7, "train": {**config["train"], "lr": 0.5}}
    (out / "config.json").write_text(json.dumps(changed))
    assert main(["--resume", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "checkpoint.pt" in error[0] and "differing: seed, train.lr" in error[0], error
    (out / "config.json").write_text(json.dumps(config))

    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert main(["--resume", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"cannot read checkpoint {out / 'checkpoint.pt'}" in error[0], error
    assert {name: (out / name).read_bytes() for name in records} == records
