"""Sources: read raw examples from builtins and user files into a `Table` or a list of documents.

Nothing here splits or scales; that happens after, so preprocessing can be fitted on train only.
Paths are relative to the current directory; a path with `*`, `?` or `[` is a glob.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard.data.anonymize import Anonymizer
from shipyard.data.config import DataConfig
from shipyard.errors import DataError

TEXT_EXTENSIONS = (".txt", ".md", ".text")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMAT_BY_EXTENSION = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".npz": "npz",
    **{ext: "text" for ext in TEXT_EXTENSIONS},
}
SUPPORTED = ", ".join(FORMAT_BY_EXTENSION) + " or a directory (image folder)"


@dataclass
class Table:
    """Examples loaded from one source, before splitting.

    x: float32 (N, *input_shape) features, or None when the examples are `texts`.
    labels: (N,) raw classification labels (str/int, encoded later), or float (N, k) regression
        targets, or None (no target).
    class_names: set when the source itself declares the classes (digits, image folders); then
        `labels` are already int ids into it.
    """

    x: np.ndarray | None
    labels: np.ndarray | None
    feature_names: list[str] | None = None
    class_names: list[str] | None = None
    texts: list[str] | None = None
    groups: np.ndarray | None = None  # (N,) group of each row (data.group_column), as strings

    def __len__(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        assert self.x is not None
        return int(self.x.shape[0])

    def take(self, idx: np.ndarray) -> Table:
        """The rows at `idx` (a new Table)."""
        return Table(
            x=None if self.x is None else self.x[idx],
            labels=None if self.labels is None else self.labels[idx],
            feature_names=self.feature_names,
            class_names=self.class_names,
            texts=None if self.texts is None else [self.texts[i] for i in idx.tolist()],
            groups=None if self.groups is None else self.groups[idx],
        )

    def update_hash(self, h: Any) -> None:
        """Feed the table's content into a hashlib object (for the data fingerprint)."""
        for name, arr in (("x", self.x), ("labels", self.labels)):
            if arr is not None:
                h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
                h.update(
                    "\x1f".join(map(str, arr.tolist())).encode()
                    if arr.dtype == object
                    else np.ascontiguousarray(arr).tobytes()
                )
        for text in self.texts or []:
            h.update(hashlib.sha256(text.encode("utf-8")).digest())


# -- builtins -------------------------------------------------------------------------------------


def load_digits() -> Table:
    """scikit-learn's bundled 8×8 digits (1797 images, pixel values 0..16), as (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)[:, None, :, :]  # (N, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    return Table(x=x, labels=y, class_names=[str(i) for i in range(10)])


def synthetic_regression(n_samples: int, n_features: int, noise: float, seed: int) -> Table:
    """A seeded regression problem: y = x·w + 0.5·sin(x·v) + noise; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_samples, n_features))
    w = rng.standard_normal(n_features)
    v = rng.standard_normal(n_features) / np.sqrt(n_features)
    y = x @ w + 0.5 * np.sin(3.0 * (x @ v)) + noise * rng.standard_normal(n_samples)
    return Table(
        x=x.astype(np.float32),
        labels=y.astype(np.float32)[:, None],  # (N, 1)
        feature_names=[f"x{i}" for i in range(n_features)],
    )


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files() -> list[Path]:
    """The standard library's own .py files, in a fixed pseudo-random order (sorted by path hash).

    Skipped: site-packages, test folders, and platform-generated files (`_sysconfigdata*`,
    `config-*` folders), so the list depends only on the Python version (distributions that patch
    the standard library can still differ; the data fingerprint records the exact text).
    """
    root = Path(os.__file__).resolve().parent
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-", "lib-dynload"))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith(("_sysconfigdata", ".")):
                rel = (rel_dir / name).as_posix()
                found.append((hashlib.sha256(rel.encode()).hexdigest(), Path(dirpath) / name))
    return [path for _, path in sorted(found)]


def read_documents(
    paths: Sequence[Path],
    max_documents: int | None,
    max_chars: int | None,
    skip_unreadable: bool = False,
) -> list[str]:
    """Read text files in order until `max_documents` / `max_chars` (the last one is cut to fit)."""
    docs: list[str] = []
    total = 0
    for path in paths:
        if max_documents is not None and len(docs) >= max_documents:
            break
        if max_chars is not None and total >= max_chars:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            if skip_unreadable:
                continue
            raise DataError(
                f"text file {str(path)!r} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                "convert it to UTF-8"
            ) from e
        except OSError as e:
            if skip_unreadable:
                continue
            raise DataError(f"cannot read text file {str(path)!r}: {e.strerror}") from e
        if not text:
            continue
        if max_chars is not None:
            text = text[: max_chars - total]
        docs.append(text)
        total += len(text)
    return docs


def load_python_stdlib(max_documents: int | None, max_chars: int | None) -> list[str]:
    """Documents of `builtin:python-stdlib` (see `stdlib_files`); non-UTF-8 files are skipped."""
    return read_documents(stdlib_files(), max_documents, max_chars, skip_unreadable=True)


# -- user files -----------------------------------------------------------------------------------


def resolve_paths(spec: str) -> list[Path]:
    """The files (or the one directory) named by a path or glob; DataError if nothing matches."""
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(
                f"glob {spec!r} matches no files (cwd: {os.getcwd()}); check the pattern"
            )
        return files
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data file {spec!r} does not exist (cwd: {os.getcwd()}); check the path")
    return [path]


def detect_format(paths: Sequence[Path], declared: str) -> str:
    """The format of `paths`: the declared one, else from the extension (a directory = images)."""
    if declared != "auto":
        return declared
    formats = set()
    for path in paths:
        if path.is_dir():
            formats.add("image-folder")
            continue
        fmt = FORMAT_BY_EXTENSION.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"unsupported file extension {path.suffix or '(none)'!r} for {str(path)!r}; "
                f"supported: {SUPPORTED} (or set data.format)"
            )
        formats.add(fmt)
    if len(formats) > 1:
        raise DataError(f"files mix formats {sorted(formats)}; give files of one format")
    return formats.pop()


def _parse_number(value: Any, column: str, where: str) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not np.isfinite(number):
        raise DataError(
            f"non-numeric value {value!r} in column {column!r}, {where}; features and regression "
            "targets must be finite numbers (fix the value, or drop the column from data.features)"
        )
    return number


def read_utf8(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); DataError naming the file,
    and the line of the first bad byte, when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({e.reason}); convert the {what} to UTF-8"
        ) from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSONL file; DataError (file:line) on a
    line that is not JSON or a file that is not UTF-8."""
    text = read_utf8(path, "JSONL file")
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); one value per line") from None
        yield n, value


def _read_csv(path: Path) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    with io.StringIO(read_utf8(path, "CSV file"), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"CSV file {str(path)!r} is empty; it needs a header row and data rows")
        header = [h.strip() for h in header]
        if all(_is_number(h) for h in header):
            raise DataError(
                f"CSV file {str(path)!r} has no header row (first row is {header[:5]}); add a "
                "first line with the column names"
            )
        rows: list[tuple[str, list[Any]]] = []
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            where = f"row {len(rows) + 1} (line {reader.line_num}) of {path.name}"
            if len(row) != len(header):
                raise DataError(
                    f"{where} has {len(row)} fields but the header has {len(header)}; fix the row"
                )
            rows.append((where, row))
    return header, rows


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    header: list[str] | None = None
    rows: list[tuple[str, list[Any]]] = []
    for line_no, obj in iter_jsonl(path):
        where = f"row {len(rows) + 1} (line {line_no}) of {path.name}"
        if not isinstance(obj, dict):
            raise DataError(f"{where} is a {type(obj).__name__}, not a JSON object")
        if header is None:
            header = list(obj)
        missing = [k for k in header if k not in obj]
        if missing:
            raise DataError(f"{where} lacks column(s) {missing}; every line needs {header}")
        rows.append((where, [obj[k] for k in header]))
    if header is None:
        raise DataError(f"JSONL file {str(path)!r} has no rows")
    return header, rows


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_records(paths: Sequence[Path], fmt: str, config: DataConfig, task: str) -> Table:
    """Rows of CSV/JSONL files: feature columns → float x, target column → labels, or texts.

    `data.anonymize` rules are applied to the rows first, before anything else reads them.
    """
    header: list[str] | None = None
    rows: list[tuple[str, list[Any]]] = []
    for path in paths:
        file_header, file_rows = _read_csv(path) if fmt == "csv" else _read_jsonl(path)
        if header is not None and file_header != header:
            raise DataError(
                f"{str(path)!r} has columns {file_header}, but earlier files have {header}"
            )
        header = file_header
        rows.extend(file_rows)
    assert header is not None
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))} has a header but no data rows")
    anonymizer = Anonymizer(config.anonymize, {})
    if config.anonymize:
        header, rows = anonymizer.apply_rows(header, rows, ", ".join(map(str, paths)))

    def column(name: str, role: str) -> int:
        if name not in header:
            raise DataError(
                f"{role} column {name!r} not found; available columns: {', '.join(header)}"
            )
        return header.index(name)

    target = config.target
    if task in ("classification", "regression") and target is None:
        if "target" not in header:
            raise DataError(
                f"data.target is required for {task}: name the target column; available "
                f"columns: {', '.join(header)}"
            )
        target = "target"
    labels: np.ndarray | None = None
    if target is not None and task != "language-modeling":
        t = column(target, "target")
        if task == "classification":
            raw = [row[t] for _, row in rows]
            labels = np.asarray(
                [str(v) if not isinstance(v, int) else v for v in raw], dtype=object
            )
        else:
            labels = np.asarray(
                [[_parse_number(row[t], target, w)] for w, row in rows], dtype=np.float32
            )

    groups: np.ndarray | None = None
    if config.group_column is not None:
        g = column(config.group_column, "group")
        groups = np.asarray([str(row[g]) for _, row in rows], dtype=object)

    if config.text_column is not None:
        c = column(config.text_column, "text")
        texts = [str(row[c]) for _, row in rows]
        return Table(x=None, labels=labels, texts=texts, groups=groups)

    features = config.features or [
        h
        for h in header
        if h not in (target, config.group_column) and h not in anonymizer.text_columns
    ]
    if not features:
        raise DataError(f"no feature columns: the only column is the target {target!r}")
    idx = [column(name, "feature") for name in features]
    x = np.empty((len(rows), len(idx)), dtype=np.float32)
    for r, (where, row) in enumerate(rows):
        for j, (c, name) in enumerate(zip(idx, features, strict=True)):
            x[r, j] = _parse_number(row[c], name, where)
    return Table(x=x, labels=labels, feature_names=list(features), groups=groups)


def load_npz(path: Path, config: DataConfig, task: str) -> Table:
    """Arrays `x` (or `X`) and `y` (or `target`, or the array named by data.target) of an NPZ."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as e:
        raise DataError(
            f"cannot read NPZ {str(path)!r} without pickle ({e}); save plain numeric/string arrays"
        ) from e
    except OSError as e:
        raise DataError(f"cannot read NPZ {str(path)!r}: {e}") from e
    available = ", ".join(sorted(arrays)) or "(none)"
    x_name = next((n for n in ("x", "X") if n in arrays), None)
    if x_name is None:
        raise DataError(
            f"NPZ {str(path)!r} has no feature array 'x' or 'X'; arrays found: {available}"
        )
    y_candidates = (config.target,) if config.target else ("y", "target")
    y_name = next((n for n in y_candidates if n in arrays), None)
    if y_name is None and task != "language-modeling":
        raise DataError(
            f"NPZ {str(path)!r} has no target array {' or '.join(map(repr, y_candidates))}; "
            f"arrays found: {available}"
        )
    x = arrays[x_name]
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise DataError(f"NPZ array {x_name!r} has dtype {x.dtype}; features must be numeric")
    if x.ndim == 1:
        x = x[:, None]
    labels = None
    if y_name is not None:
        y = arrays[y_name]
        if y.shape[0] != x.shape[0]:
            raise DataError(
                f"NPZ arrays {x_name!r} ({x.shape[0]} rows) and {y_name!r} ({y.shape[0]} rows) "
                "differ in length"
            )
        if task == "classification":
            labels = np.asarray(
                [v if isinstance(v, int) else str(v) for v in y.reshape(len(y), -1)[:, 0].tolist()],
                dtype=object,
            )
        else:
            if not np.issubdtype(y.dtype, np.number):
                raise DataError(f"NPZ target {y_name!r} has dtype {y.dtype}; need numbers")
            labels = y.reshape(len(y), -1).astype(np.float32)  # (N, k)
    feature_names = [f"x{i}" for i in range(x.shape[1])] if x.ndim == 2 else None
    return Table(x=x.astype(np.float32), labels=labels, feature_names=feature_names)


def load_image_folder(root: Path, config: DataConfig) -> Table:
    """One sub-folder per class; pixels as float32 in [0, 1], shape (N, C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {str(root)!r} has no class sub-folders; put each class's images in "
            "a sub-folder named after the class"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[Path, tuple[int, ...]] | None = None
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in files:
            try:
                with Image.open(path) as opened:
                    img = opened.convert("L" if config.grayscale else "RGB")
                if config.image_size is not None:
                    h, w = config.image_size
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"cannot read image {str(path)!r}: {e}") from e
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (C, H, W)
            if first is None:
                first = (path, arr.shape)
            elif arr.shape != first[1]:
                raise DataError(
                    f"images differ in size: {str(first[0])!r} is {first[1][1]}x{first[1][2]} "
                    f"but {str(path)!r} is {arr.shape[1]}x{arr.shape[2]} (HxW); set "
                    "data.image_size to resize them all"
                )
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(
            f"image folder {str(root)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
            "class sub-folders"
        )
    return Table(x=np.stack(images), labels=np.asarray(labels, dtype=np.int64), class_names=classes)


def load_table(spec: str, config: DataConfig, task: str, seed: int) -> Table:
    """Load a builtin or user source (`spec`: builtin:NAME, path or glob) as a Table."""
    if spec.startswith("builtin:"):
        _no_anonymize(config, spec)
    if spec == "builtin:digits":
        return load_digits()
    if spec == "builtin:synthetic-regression":
        return synthetic_regression(config.n_samples, config.n_features, config.noise, seed)
    if spec.startswith("builtin:"):
        raise DataError(f"{spec} is a text corpus; it has no rows for {task}")
    paths = resolve_paths(spec)
    fmt = detect_format(paths, config.format)
    if fmt in ("csv", "jsonl"):
        return load_records(paths, fmt, config, task)
    _no_anonymize(config, fmt)
    if fmt == "npz":
        tables = [load_npz(p, config, task) for p in paths]
        if len(tables) == 1:
            return tables[0]
        return Table(
            x=np.concatenate([t.x for t in tables if t.x is not None]),
            labels=None
            if tables[0].labels is None
            else np.concatenate([t.labels for t in tables if t.labels is not None]),
            feature_names=tables[0].feature_names,
        )
    if fmt == "image-folder":
        if len(paths) != 1 or not paths[0].is_dir():
            raise DataError(f"image-folder source {spec!r} must be one directory")
        return load_image_folder(paths[0], config)
    raise DataError(
        f"{spec!r} is {fmt} data, which has no rows for {task}; use a CSV, JSONL, NPZ or image "
        "folder (or task language-modeling for text)"
    )


def load_texts(spec: str, config: DataConfig) -> list[str]:
    """Documents of a text source: builtin:python-stdlib, text files/globs, or a text column."""
    if spec == "builtin:python-stdlib":
        _no_anonymize(config, spec)
        return load_python_stdlib(config.max_documents, config.max_chars)
    if spec.startswith("builtin:"):
        raise DataError(f"{spec} is not a text corpus; use builtin:python-stdlib or text files")
    paths = resolve_paths(spec)
    fmt = detect_format(paths, config.format)
    if fmt == "text":
        _no_anonymize(config, fmt)
        dirs = [p for p in paths if p.is_dir()]
        if dirs:
            raise DataError(f"{str(dirs[0])!r} is a directory; give text files or a glob")
        return read_documents(paths, config.max_documents, config.max_chars)
    if fmt in ("csv", "jsonl"):
        if config.text_column is None:
            raise DataError(
                f"{spec!r} is {fmt}: set data.text_column to the column holding the documents"
            )
        texts = load_records(paths, fmt, config, "language-modeling").texts or []
        return read_documents_from_strings(texts, config.max_documents, config.max_chars)
    raise DataError(
        f"{spec!r} is {fmt} data, not text; language modeling needs .txt/.md files, a CSV/JSONL "
        "with data.text_column, or builtin:python-stdlib"
    )


def read_documents_from_strings(
    texts: Sequence[str], max_documents: int | None, max_chars: int | None
) -> list[str]:
    """Apply the `max_documents` / `max_chars` caps to in-memory documents."""
    docs: list[str] = []
    total = 0
    for text in texts:
        if max_documents is not None and len(docs) >= max_documents:
            break
        if max_chars is not None:
            if total >= max_chars:
                break
            text = text[: max_chars - total]
        if text:
            docs.append(text)
            total += len(text)
    return docs


def _no_anonymize(config: DataConfig, what: str) -> None:
    if config.anonymize:
        raise DataError(
            f"data.anonymize works on CSV/JSONL columns, but the data is {what}; remove "
            "data.anonymize or convert the data to CSV/JSONL"
        )
