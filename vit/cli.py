"""The LightningCLI that ``train.py`` runs: fit, validate, test and predict from YAML recipes."""

from __future__ import annotations

import importlib.util
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning as L
import torch
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from vit.allocator import keep_freed_memory
from vit.checkpoint import CheckpointError
from vit.data import DataNotFoundError
from vit.errors import ConfigError
from vit.fault_tolerance import (
    AtomicCheckpointIO,
    CheckpointOnSIGTERM,
    LastCheckpoint,
    RandomState,
    check_checkpoint,
    find_last_checkpoint,
)
from vit.hardware import has_bf16_units
from vit.imageio import ImageDecodeError
from vit.lit import Classifier
from vit.prediction_writer import PredictionWriter
from vit.run_info import RunInfo

# Errors that a user fixes in the command or the data: train.py shows them as one message.
USER_ERRORS = (
    ConfigError, DataNotFoundError, CheckpointError, ImageDecodeError, FloatingPointError,
    MisconfigurationException,
)
SUBCOMMAND_USAGE = "%(prog)s [--config FILE] [--OPTION VALUE ...]"

_UNION_ERROR = re.compile(
    r'Parser key "(?P<group>\w+)":\s+Does not validate against any of the Union subtypes.*?'
    r"Problem with given class_path '(?P<cls>[\w.]+)':\s*(?P<problem>.*?)\n\s*- Expected a "
    r"<class 'NoneType'>",
    re.DOTALL,
)


def plain_option_error(message: str, prog: str) -> str:
    """jsonargparse's message for a bad ``--data.*`` option (a subclass, so a union with None)
    as the one problem it holds, named as the command line names it."""
    found = _UNION_ERROR.search(message)
    if found is None:
        return message
    group, cls = found["group"], found["cls"]
    if cls.endswith(".LightningDataModule"):  # the base class: no recipe chose a data module
        return (f"no data module is set, so --{group} options have nowhere to go: start from a "
                f"recipe (--config configs/quickstart.yaml, or another of configs/), or choose "
                f"one with --data vit.data.ImageDataModule or --data vit.text_data.TextDataModule.")
    problem = re.sub(r"Option '(\w+)' is not accepted",
                     lambda m: f"--{group}.{m[1]} is not an option of {cls}", found["problem"])
    problem = re.sub(r'Parser key "(\w+)":\s*', lambda m: f"--{group}.{m[1]}: ", problem)
    problem = " ".join(problem.split())
    return f"{problem} ({prog} --{group}.help {cls} lists its options)"


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose errors about ``--data.*`` options say which option and why."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(plain_option_error(message, self.prog.replace(" [options]", "")), ex)


def default_loggers(save_dir: str) -> list[Logger]:
    """CSV logs always, TensorBoard logs beside them when tensorboard is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir, name="")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(save_dir, name="", version=loggers[0].version))
    return loggers


def warn_if_bf16_is_emulated(trainer: L.Trainer) -> None:
    """Warn when a run asks for bfloat16 on a CPU that has no bf16 units: it would run slower
    than in float32, not faster."""
    if "bf16" in str(trainer.precision) and isinstance(trainer.accelerator, CPUAccelerator) \
            and not has_bf16_units(torch.device("cpu")):
        rank_zero_warn(
            f"--trainer.precision {trainer.precision}: this CPU has no bfloat16 units (Intel AMX "
            f"or AVX512-BF16), so bf16 runs several times slower than float32 here; "
            f"use --trainer.precision 32-true."
        )


class TrainCLI(LightningCLI):
    """LightningCLI with the data module's ``spec`` linked into the model, default loggers
    under ``trainer.default_root_dir``, best/last checkpoints written atomically (and every N
    steps on request), a checkpoint on SIGTERM, ``--ckpt_path last`` resolved across the
    root's ``version_N`` folders, ``run_info.json`` beside the logs, and a test after ``fit``."""

    def __init__(self, **kwargs: Any) -> None:
        parser_kwargs = kwargs.pop("parser_kwargs", {})
        for subcommand in self.subcommands():
            parser_kwargs.setdefault(subcommand, {}).setdefault("usage", SUBCOMMAND_USAGE)
        super().__init__(
            Classifier,
            L.LightningDataModule,
            subclass_mode_data=True,
            parser_class=ArgumentParser,
            trainer_defaults={
                "default_root_dir": "runs",
                "callbacks": [
                    ModelCheckpoint(
                        monitor="val/acc", mode="max",
                        filename="epoch{epoch:03d}-val_acc{val/acc:.4f}",
                        auto_insert_metric_name=False,
                    ),
                    LearningRateMonitor(logging_interval="step"),
                    RandomState(),
                    CheckpointOnSIGTERM(),
                    RunInfo(),
                    PredictionWriter(),
                ],
            },
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.spec", "model.data_spec", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="After fit, test on the test split (the weights that --test_weights names).",
        )
        parser.add_argument(
            "--test_weights", type=Literal["best", "last"], default="best",
            help="Weights the test after fit scores: best, the checkpoint of the best validation "
                 "accuracy; last, those at the end of training (for runs whose schedule anneals "
                 "to its end, where picking the best of many noisy validations favours noise).",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps", type=int | None, default=None,
            help="Also write last.ckpt every N optimiser steps, not only at the end of each epoch.",
        )

    def before_instantiate_classes(self) -> None:
        root = self._get(self.config, "trainer").get("default_root_dir") or "runs"
        if "://" in str(root):
            return
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
        except OSError as err:
            raise ConfigError(
                f"--trainer.default_root_dir {root}: cannot write there ({err.strerror}); "
                f"choose a folder you can write to."
            ) from None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or "runs")
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, TypeError, ValueError) as err:  # Lightning's checks
            raise ConfigError(f"{err} (check the --trainer options)") from None
        # last.ckpt after every epoch (a cut-short one included) and every validation
        # (Lightning's save_last only follows a new best), and every N steps when asked: one
        # callback each, as Lightning takes one trigger per callback
        trainer.callbacks.append(LastCheckpoint())
        every = self._get(self.config, "checkpoint_every_n_steps")
        if every:
            trainer.callbacks.append(ModelCheckpoint(
                filename="last", enable_version_counter=False, every_n_train_steps=every
            ))
        warn_if_bf16_is_emulated(trainer)
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then turn ``--ckpt_path last`` into the newest good checkpoint under the root
        directory and check that a checkpoint file given by name is readable, before the
        model options are read from it and before anything is built."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        ckpt_path = config.get("ckpt_path") if config else None
        if ckpt_path == "last":
            root = config.trainer.get("default_root_dir") or "runs"
            found = find_last_checkpoint(root)
            if found is None and subcommand != "fit":
                raise ConfigError(
                    f"--ckpt_path last: no readable last.ckpt under {root}; train first, or "
                    f"pass a checkpoint file with --ckpt_path."
                )
            rank_zero_info(f"--ckpt_path last: resuming from {found}" if found else
                           f"--ckpt_path last: no checkpoint under {root} yet, starting afresh")
            config.ckpt_path = str(found) if found else None
        elif ckpt_path and ckpt_path not in ("best", "hpc") and "://" not in ckpt_path \
                and not ckpt_path.startswith("registry"):
            check_checkpoint(ckpt_path)

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit") or self.trainer.state.status != "finished":
            return
        has_split = getattr(self.datamodule, "has_split", None)  # this project's data modules
        if has_split is not None and not has_split("test"):
            rank_zero_info("note: the data has no test split, so the fit is not followed by a "
                           "test; add one to test the model, or pass --test_after_fit false.")
            return
        if self._get(self.config, "test_weights") == "last":
            # The weights in memory: those at the last step (EMA's average, when it runs), as
            # last.ckpt holds them, without reading the file back.
            ckpt = None
        else:
            ckpt = self.trainer.checkpoint_callback.best_model_path or None
            if ckpt is None:
                rank_zero_info("note: no validation ran, so there is no best checkpoint; the "
                               "test scores the weights at the end of training.")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def config_paths(args: list[str]) -> list[str]:
    """The files named by ``--config``/``-c`` in ``args``, in any of their spellings."""
    paths = [value for option, value in zip(args, args[1:]) if option in ("--config", "-c")]
    for arg in args:
        for prefix in ("--config=", "-c="):
            if arg.startswith(prefix):
                paths.append(arg.removeprefix(prefix))
    return paths


def check_config_files(args: list[str]) -> None:
    """Raise a ``ConfigError`` naming the ``--config`` file whose YAML does not parse, with the
    line and column (the parser's own message names no file). Values are not built: only the
    syntax is checked, as the parser reads the values its own way."""
    for path in config_paths(args):
        try:
            with open(path, encoding="utf-8") as file:
                for _ in yaml.parse(file):
                    pass
        except (OSError, UnicodeDecodeError):
            continue  # the parser says that a file is missing or unreadable
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError(f"--config {path} is not valid YAML: {where}{err.problem}.") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path} is not valid YAML: {err}") from None


def main(args: list[str] | None = None) -> TrainCLI:
    """Run the command line (``args`` instead of ``sys.argv`` when given)."""
    check_config_files(list(sys.argv[1:] if args is None else args))
    # The data modules serve batches from tensors already in memory, where worker processes
    # only add copies (an epoch of CIFAR-10 batches: 7x slower with two workers than with none,
    # benchmarks/RESULTS.md): Lightning's advice to add DataLoader workers does not apply.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    keep_freed_memory()
    return TrainCLI(args=args)


def user_error(error: BaseException) -> BaseException | None:
    """The error of ``USER_ERRORS`` that ``error`` is or was raised from, if any."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def run(args: list[str] | None = None) -> int:
    """``main`` as a program: a user's error is one line on stderr and exit status 1."""
    try:
        main(args)
    except Exception as error:
        found = user_error(error)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 1
    return 0
