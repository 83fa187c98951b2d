"""The classify script: the top-k classes of image files, folders, glob patterns or texts.

    python -m vit.classify runs/quickstart/version_0/checkpoints/last.ckpt photos/ "more/*.png"
    vit-classify bundle/ --text "a gripping film" --text-file reviews.txt --format json | jq

Results go to stdout (or ``--output``), a progress bar and one line per bad input to stderr.
Exit status: 0 when every input was classified, 1 when any failed, 2 when nothing could
start (a bad checkpoint or command line).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import textwrap
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from tqdm.auto import tqdm

from vit.allocator import keep_freed_memory
from vit.checkpoint import CheckpointError
from vit.errors import positive_int
from vit.imageio import IMAGE_EXTENSIONS, is_image_file
from vit.predictor import Prediction, Predictor

PROGRESS_THRESHOLD = 10  # more inputs than this show a progress bar


@dataclass(frozen=True)
class Item:
    """One input: its name in the results, where it came from, and what to read."""

    name: str  # the path, or the text itself
    where: str  # how error lines name it: the path, "--text 2" or "reviews.txt:7"
    source: str | Path


def expand_paths(arguments: Sequence[str]) -> tuple[list[Item], list[str]]:
    """Files, folders (searched recursively for images) and glob patterns -> (items, failures)."""
    paths: list[Path] = []
    failures: list[str] = []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            if not found:
                failures.append(
                    f"{argument}: folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif any(c in argument for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(argument), recursive=True))
            if not matches:
                failures.append(f"{argument}: no file matches this pattern")
            for match in map(Path, matches):
                if match.is_dir():
                    paths.extend(sorted(p for p in match.rglob("*") if p.is_file() and is_image_file(p)))
                else:
                    paths.append(match)
        else:
            failures.append(f"{argument}: no such file or folder")
    unique = list(dict.fromkeys(paths))
    return [Item(str(p), str(p), p) for p in unique], failures


def read_texts(texts: Sequence[str], text_files: Sequence[str]) -> tuple[list[Item], list[str]]:
    """``--text`` values and the lines of each ``--text-file`` -> (items, failures)."""
    items = [Item(text, f"--text {i}", text) for i, text in enumerate(texts, start=1)]
    failures = []
    for file in text_files:
        try:
            # "\n" alone ends a line (read_text turns "\r\n" and "\r" into it); splitlines
            # would also split at form feeds and Unicode's separators inside a line
            lines = Path(file).expanduser().read_text(encoding="utf-8-sig").split("\n")
            if lines[-1] == "":
                lines.pop()
        except FileNotFoundError:
            failures.append(f"{file}: no such text file")
            continue
        except (OSError, UnicodeDecodeError) as err:
            failures.append(f"{file}: cannot read as UTF-8 text ({err})")
            continue
        if not lines:
            failures.append(f"{file}: the text file is empty")
        items.extend(Item(line, f"{file}:{n}", line) for n, line in enumerate(lines, start=1))
    return items, failures


def _prepare(predictor: Predictor, item: Item) -> tuple[torch.Tensor, bool] | Exception:
    """An item's tensor and whether it was truncated, or the exception that stopped it."""
    try:
        if predictor.modality == "text":
            return predictor.encode_text(item.source)
        return predictor.image_tensor(item.source), False
    except Exception as err:  # any one input's failure is reported, and the others go on
        return err


def prepared_in_order(
    predictor: Predictor, items: Iterable[Item], workers: int, ahead: int
) -> Iterator[tuple[Item, tuple[torch.Tensor, bool] | Exception]]:
    """Decode or tokenize ``items`` on ``workers`` threads, at most ``ahead`` ahead of the
    consumer, so that decoding runs while the model works on the previous batch."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        queue: deque[tuple[Item, Future]] = deque()
        pending = iter(items)
        for item in pending:
            queue.append((item, pool.submit(_prepare, predictor, item)))
            if len(queue) >= ahead:
                break
        while queue:
            item, future = queue.popleft()
            following = next(pending, None)
            if following is not None:
                queue.append((following, pool.submit(_prepare, predictor, following)))
            yield item, future.result()


def table_cell(name: str, width: int, *, path: bool = False) -> str:
    """``name`` on one line in at most ``width`` characters: a file's ``path`` keeps its end,
    where the file name is; a text its first words."""
    if path:
        return name if len(name) <= width else "..." + name[-(width - 3):]
    flat = " ".join(name.split())
    if len(flat) <= width:
        return flat
    shortened = textwrap.shorten(flat, width, placeholder="...")
    return shortened if shortened != "..." else flat[:width - 3] + "..."


class ResultWriter:
    """Writes each input's predictions as an aligned table, a JSON array or CSV rows."""

    def __init__(self, out: IO[str], fmt: str, name_width: int, *, paths: bool) -> None:
        """``paths``: the inputs are files (shortened to their ends), not texts."""
        self.out, self.fmt, self.count = out, fmt, 0
        self.name_width = min(name_width, 60)
        self.paths = paths
        self.csv = csv.writer(out) if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow(["input", "rank", "label", "probability"])

    def write(self, name: str, predictions: list[Prediction]) -> None:
        if self.fmt == "json":
            record = {
                "input": name,
                "predictions": [
                    {"label": p.label, "probability": round(p.probability, 6)} for p in predictions
                ],
            }
            self.out.write(("[\n  " if self.count == 0 else ",\n  ") + json.dumps(record, ensure_ascii=False))
        elif self.csv is not None:
            self.csv.writerows(
                [name, rank, p.label, f"{p.probability:.6f}"] for rank, p in enumerate(predictions, 1)
            )
        else:
            shown = table_cell(name, self.name_width, path=self.paths)
            cells = "  ".join(f"{p.label} {p.probability:.3f}" for p in predictions)
            self.out.write(f"{shown:<{self.name_width}}  {cells}\n")
        self.count += 1

    def close(self) -> None:
        if self.fmt == "json":
            self.out.write("\n]\n" if self.count else "[]\n")
        self.out.flush()


def classify_items(
    predictor: Predictor,
    items: Sequence[Item],
    *,
    top_k: int,
    batch_size: int,
    workers: int,
    on_result: Callable[[Item, list[Prediction]], None],
    on_error: Callable[[Item, Exception], None],
) -> int:
    """Classify ``items`` in batches, decoding in parallel with the model; returns how many
    were truncated (texts longer than the model's max_length)."""
    batch: list[tuple[Item, torch.Tensor]] = []
    truncated = 0

    def flush() -> None:
        probabilities = predictor.probabilities(predictor.collate([t for _, t in batch]))
        for (item, _), predictions in zip(batch, predictor.top_k(probabilities, top_k)):
            on_result(item, predictions)
        batch.clear()

    for item, outcome in prepared_in_order(predictor, items, workers, ahead=2 * batch_size):
        if isinstance(outcome, Exception):
            on_error(item, outcome)
            continue
        tensor, was_truncated = outcome
        truncated += was_truncated
        batch.append((item, tensor))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return truncated


def describe_failure(item: Item, err: Exception) -> str:
    """``where: reason`` for one failed input (image errors already name their file)."""
    reason = str(err) or type(err).__name__
    return reason if reason.startswith(item.where) else f"{item.where}: {reason}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vit-classify",
        description="Print the top-k classes of images or texts with a trained model.",
        epilog="Exit status: 0 all inputs classified, 1 some input failed, 2 nothing could start.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py, or a bundle folder "
                        "written by python -m vit.export")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders "
                        "(searched recursively) and glob patterns (quote them: 'photos/**/*.png')")
    parser.add_argument("--text", action="append", default=[], help="a text to classify "
                        "(repeatable), for a text model")
    parser.add_argument("--text-file", action="append", default=[], metavar="FILE",
                        help="a UTF-8 file of texts, one a line (repeatable), for a text model")
    parser.add_argument("--top-k", type=positive_int, default=5,
                        help="classes per input, at most the number of classes (default 5)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="how results are written (default table)")
    parser.add_argument("--output", metavar="FILE", help="write results here instead of stdout")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="inputs per forward pass (default 64)")
    parser.add_argument("--device", default="auto",
                        help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=positive_int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding images or tokenizing texts (default: CPU cores, up to 8)")
    return parser


def _gather(args: argparse.Namespace, predictor: Predictor) -> tuple[list[Item], list[str]]:
    has_texts = bool(args.text or args.text_file)
    if predictor.modality == "text":
        if args.inputs:
            raise ValueError(
                f"{args.checkpoint} is a text classifier, given {len(args.inputs)} file "
                f"argument(s): pass texts with --text or --text-file."
            )
        if not has_texts:
            raise ValueError("nothing to classify: pass texts with --text or --text-file.")
        return read_texts(args.text, args.text_file)
    if has_texts:
        raise ValueError(
            f"{args.checkpoint} is an image classifier, given --text/--text-file: pass image "
            f"files, folders or glob patterns."
        )
    if not args.inputs:
        raise ValueError("nothing to classify: pass image files, folders or glob patterns.")
    return expand_paths(args.inputs)


def open_output(path: str) -> IO[str]:
    """``--output``'s file, opened for writing; a message that names the option if it cannot be."""
    try:
        return open(path, "w", encoding="utf-8", newline="")
    except OSError as err:
        raise OSError(f"--output {path}: cannot write there ({err.strerror}); pass a file in a "
                      f"folder that exists and can be written.") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script (``argv`` instead of ``sys.argv[1:]`` when given); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    try:
        predictor = Predictor.load(args.checkpoint, device=args.device)
        items, failures = _gather(args, predictor)
        out = open_output(args.output) if args.output else sys.stdout
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    writer = ResultWriter(out, args.format, max((len(i.name) for i in items), default=0),
                          paths=predictor.modality == "image")
    progress = tqdm(total=len(items), unit="input", file=sys.stderr,
                    disable=len(items) <= PROGRESS_THRESHOLD, dynamic_ncols=True)
    failed = len(failures)

    def on_error(item: Item, err: Exception) -> None:
        nonlocal failed
        failed += 1
        progress.write(f"error: {describe_failure(item, err)}", file=sys.stderr)
        progress.update()

    def on_result(item: Item, predictions: list[Prediction]) -> None:
        writer.write(item.name, predictions)
        progress.update()

    try:
        truncated = classify_items(
            predictor, items, top_k=args.top_k, batch_size=args.batch_size,
            workers=args.workers, on_result=on_result, on_error=on_error,
        )
        writer.close()
    except BrokenPipeError:  # the reader (head, less) has gone: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    if truncated:
        print(f"note: {truncated} text(s) longer than max_length={predictor.spec['max_length']} "
              f"tokens were truncated.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
