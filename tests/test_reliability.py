"""Training survives kills, bad configurations fail early and clearly, runs reproduce, DDP shards.

The kill test and the DDP test start real processes on the bundled sample, each bounded by a
timeout; the others run the command line in this process.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from benchmarks.kill_resume import kill_and_resume, val_accuracy, weight_difference
from vit.cli import run
from vit.ema import EMA
from vit.fault_tolerance import AtomicCheckpointIO, RandomState, find_last_checkpoint
from vit.loss_watch import NonFiniteLossWatch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10-sample"
NANO = [
    "--config", str(REPO / "configs" / "quickstart.yaml"), "--data.root", str(SAMPLE),
    "--model.variant", "nano", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def fit(tmp_path: Path, *extra: str) -> int:
    return run(["fit", *NANO, "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])


def metrics(run_dir: Path) -> list[dict[str, str]]:
    """The logged metrics of a run, without the wall-clock column (no two runs share it)."""
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if k != "time/fit_minutes"} for row in rows]


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    class DiesWhileSaved:
        def __reduce__(self):
            raise RuntimeError("killed in the middle of the save")

    with pytest.raises(RuntimeError, match="killed in the middle"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}, "x": DiesWhileSaved()}, path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_broken_checkpoints_are_named_given_explicitly_and_skipped_by_last(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 3}, good)
    truncated = tmp_path / "runs" / "version_1" / "checkpoints" / "last.ckpt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    os.utime(truncated, ns=(good.stat().st_mtime_ns + 10**9,) * 2)  # the newest, as a kill leaves it
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04" + os.urandom(64))

    with pytest.warns(UserWarning, match="version_1"):
        assert find_last_checkpoint(tmp_path / "runs") == good
    for broken in (truncated, garbage):
        assert fit(tmp_path, "--ckpt_path", str(broken)) == 1
        err = capsys.readouterr().err
        assert f"error: {broken}: not a readable PyTorch checkpoint" in err and "Traceback" not in err


def _image_folder(root: Path, splits: dict[str, list[str]]) -> Path:
    image = next((SAMPLE / "train" / "cat").iterdir())
    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            shutil.copy(image, root / split / name / image.name)
    return root


BAD_CONFIGS = {
    "patch size": (["--model.patch_size", "5"], "--model.patch_size 5 does not divide --data.image_size 32"),
    "heads": (["--model.num_heads", "3"], "--model.num_heads 3 does not divide"),
    "no heads": (["--model.num_heads", "0"], "--model.num_heads must be at least 1, got 0."),
    "no blocks": (["--model.depth", "0"], "--model.depth must be at least 1, got 0."),
    "no pixels": (["--data.image_size", "0"], "--data.image_size must be at least 1, got 0."),
    "all warmup": (["--model.warmup_fraction", "1.0"],
                   "--model.warmup_fraction must be in [0, 1), got 1.0."),
    "validation split of none": (["--data.root", "{tmp}/two_images"],
                                 "--data.val_fraction 0.1 of 2 training images holds out 0"),
    "missing data": (["--data.root", "{tmp}/nowhere"], "no image data at --data.root {tmp}/nowhere"),
    "empty data folder": (["--data.root", "{tmp}/empty"], "train/ holds no class folders with images"),
    "class folders differ": (["--data.root", "{tmp}/mismatch"], "only in train: ['dog'], only in test: ['bird']"),
    "unwritable log dir": (["--trainer.default_root_dir", "{tmp}/a_file/runs"],
                           "--trainer.default_root_dir {tmp}/a_file/runs: cannot write there"),
    "trainer option": (["--trainer.num_nodes", "0"], "got 0. (check the --trainer options)"),
    "EMA decay": (["--trainer.callbacks+=vit.ema.EMA", "--trainer.callbacks.decay=1.5"],
                  "--trainer.callbacks.decay 1.5: the EMA decay must lie between 0 and 1"),
    "EMA never updated": (["--trainer.callbacks+=vit.ema.EMA", "--trainer.callbacks.update_every_n_steps=0"],
                          "--trainer.callbacks.update_every_n_steps 0: the average must be updated"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_fail_before_training_with_one_clear_message(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    _image_folder(tmp_path / "mismatch", {"train": ["cat", "dog"], "test": ["bird", "cat"]})
    _image_folder(tmp_path / "two_images", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    (tmp_path / "a_file").write_text("")
    options, message = BAD_CONFIGS[case]
    assert fit(tmp_path, *(o.format(tmp=tmp_path) for o in options)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("**/metrics.csv"))  # nothing trained


def test_data_without_a_test_split_trains_and_says_why_it_is_not_tested(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "no_test"
    for name in ("cat", "dog"):
        (root / "train" / name).mkdir(parents=True)
        for image in sorted((SAMPLE / "train" / name).iterdir())[:10]:
            shutil.copy(image, root / "train" / name / image.name)
    with caplog.at_level("INFO"):
        assert fit(tmp_path, "--data.root", str(root), "--trainer.max_steps", "1") == 0
    assert "the data has no test split, so the fit is not followed by a test" in caplog.text
    assert list((tmp_path / "runs").rglob("last.ckpt"))


def test_an_unknown_option_is_named_without_pages_of_usage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--model.heads", "2")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized arguments: --model.heads 2" in err
    assert "fit --help" in err and len(err.splitlines()) <= 4, err


@pytest.mark.parametrize(("option", "message"), [
    ("--data.rot", r"--data.rot is not an option of vit.data.ImageDataModule \(\S+ fit --data.help "
                   r"vit.data.ImageDataModule lists its options\)"),
    ("--data.batch_size", r"--data.batch_size: Expected a <class 'int'>. Got value: abc \("),
])
def test_a_bad_data_option_is_named_and_where_its_options_are_listed(
    option: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, option, "abc")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(f"error: {message}", err), err
    assert "Union subtypes" not in err and "NestedArg" not in err
    with pytest.raises(SystemExit):  # no recipe, so no data module to take the option
        run(["fit", option, "abc"])
    assert "error: no data module is set, so --data options have nowhere to go: start from a " \
           "recipe (--config configs/quickstart.yaml" in capsys.readouterr().err


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert fit(tmp_path, "--model.lr", "1e30", "--model.warmup_fraction", "0", "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "6", "--checkpoint_every_n_steps", "1") == 1
    err = capsys.readouterr().err
    step = int(re.search(r"error: non-finite training loss \(\w+\) at step (\d+)", err).group(1))
    checkpoint = torch.load(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == step >= 1
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_the_loss_watch_names_the_first_non_finite_step_only_when_asked() -> None:
    watch = NonFiniteLossWatch()
    watch.raise_if_seen()  # nothing noted yet
    for step, loss in enumerate([2.3, 1.9, float("nan"), 1.7, float("inf")]):
        watch.note(torch.tensor(loss), step)
        if step < 2:
            watch.raise_if_seen()
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 2: lower"):
        watch.raise_if_seen()


def test_same_config_and_seed_twice_give_identical_metrics_and_record_the_run(tmp_path: Path) -> None:
    options = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
               "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
               "--trainer.log_every_n_steps", "1", "--test_after_fit", "false"]
    assert fit(tmp_path / "a", *options) == 0 and fit(tmp_path / "b", *options) == 0
    first, second = (tmp_path / side / "runs" / "version_0" for side in "ab")
    rows = metrics(first)
    assert len([r for r in rows if r["train/loss_step"]]) == 6 and rows == metrics(second)
    info = json.loads((first / "run_info.json").read_text())
    assert info["packages"]["torch"] == version("torch") and info["packages"]["lightning"] == version("lightning")
    assert re.fullmatch(r"[0-9a-f]{40}", info["git"]["commit"]) and isinstance(info["git"]["dirty"], bool)
    assert (first / "config.yaml").is_file()


def test_sigkills_at_random_moments_and_a_sigterm_cost_no_steps_and_no_accuracy(tmp_path: Path) -> None:
    reference, resumed, stops = kill_and_resume(tmp_path, kills=5, epochs=2, every=2, batch_size=32,
                                                batches_per_epoch=5, timeout=120)
    kills = [stop for stop in stops if stop.signal == "SIGKILL"]
    assert len(kills) == 5 and all(stop.exit_code == -signal.SIGKILL for stop in kills)
    assert any(stop.during_save for stop in kills)
    assert all(0 <= stop.steps_lost <= 2 for stop in kills if not stop.during_save)
    sigterm = stops[-1]
    assert sigterm.signal == "SIGTERM" and sigterm.exit_code == 0 and sigterm.steps_lost == 0
    assert resumed.global_step == reference.global_step == 10
    assert abs(resumed.val_acc - reference.val_acc) <= 0.01, (reference, resumed, stops)
    assert weight_difference(reference.checkpoint, resumed.checkpoint) < 1e-6  # the same run


def test_ddp_on_two_cpu_processes_shards_syncs_and_writes_once(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    command = [sys.executable, str(REPO / "train.py"), "fit", *NANO, "--trainer.default_root_dir", str(root),
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
               "--trainer.max_epochs", "1", "--test_after_fit", "false"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the DDP run did not finish in 300 s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    # one process decoded the images into the cache, the other read them from there
    assert len(re.findall(r"decoding cifar10-sample/train: 100%", output)) == 1, output[-3000:]

    run_dir = root / "version_0"
    assert [p.name for p in root.iterdir()] == ["version_0"]
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # the best and last.ckpt, once
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 7  # 450 of the 900 images per rank

    logged = [float(r["val/acc"]) for r in metrics(run_dir) if r["val/acc"]]
    assert logged == [pytest.approx(val_accuracy(last), abs=1e-6)]  # both halves of the split counted


def test_a_text_file_without_the_named_columns_is_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for split in ("train", "dev", "test"):
        (tmp_path / "text" / f"{split}.tsv").parent.mkdir(exist_ok=True)
        (tmp_path / "text" / f"{split}.tsv").write_text("review\tstars\na fine film\t5\n")
    code = run(["fit", "--config", str(REPO / "configs" / "sst2_cpu.yaml"),
                "--data.root", str(tmp_path / "text"),
                "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "has no column 'sentence' or 'label'" in lines[0], err


@pytest.mark.parametrize("hook,message", [
    ("on_train_batch_end", r"SIGTERM: saved \S+last\.ckpt at step 2;"),
    ("on_validation_batch_end", r"SIGTERM: \S+last\.ckpt already holds step 3;"),
])
def test_sigterm_writes_last_ckpt_once(
    hook: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In the second of three training batches the SIGTERM callback writes last.ckpt; in the
    last validation batch Lightning stops after the epoch end, whose last.ckpt at the same step
    is kept instead of written again."""
    saves = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        if Path(path).name == "last.ckpt":
            saves.append(checkpoint["global_step"])
        save(self, checkpoint, path, storage_options)

    def sigterm_in_second_batch(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    monkeypatch.setattr(RandomState, hook, sigterm_in_second_batch)
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0",
            "--test_after_fit", "false")
    assert stopped.value.code is None  # exit status 0
    step = 2 if hook == "on_train_batch_end" else 3
    assert saves == [step]
    assert re.search(message, caplog.text), caplog.text[-2000:]
    last = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step
    monkeypatch.undo()
    assert fit(tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
               "--trainer.limit_val_batches", "2", "--test_after_fit", "false", "--ckpt_path", "last") == 0
    resumed = torch.load(tmp_path / "runs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 6)  # the second epoch, once


def test_a_sigterm_during_validation_keeps_the_average_and_the_raw_weights_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between validation batches the model holds EMA's average and the average model the raw
    weights; last.ckpt must still store the average as state_dict, the raw as current_model_state."""
    seen = {}

    def sigterm_after_first_validation_batch(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if batch_idx == 0 and not trainer.sanity_checking:
            ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
            seen["average"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            seen["raw"] = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RandomState, "on_validation_batch_end", sigterm_after_first_validation_batch)
    with pytest.raises(SystemExit):
        fit(tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "3", "--trainer.callbacks+=vit.ema.EMA",
            "--trainer.callbacks.decay", "0.5", "--test_after_fit", "false")
    last = torch.load(tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    name = "net.head.weight"
    assert not torch.equal(seen["average"][name], seen["raw"][name])
    assert torch.equal(last["state_dict"][name], seen["average"][name])
    assert torch.equal(last["current_model_state"][name], seen["raw"][name])
