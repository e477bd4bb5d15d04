"""Corpus sources: local files and globs, Hugging Face Hub datasets, the embedded default.

A *document* is a list of non-empty lines. In text files documents are separated by blank
(whitespace-only) lines; in JSONL / CSV / Parquet / Hub sources each row is a document
whose text is split on newlines. Everything streams: one document is in memory at a time.
"""

from __future__ import annotations

import ast
import codecs
import csv
import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from ..atomic import atomic_file
from ..config import ConfigError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw", ".tokens"}
ROW_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet"}
SNIFF_BYTES = 1024
"""How much of a file is looked at to tell text from a binary file."""


@dataclass
class CorpusStats:
    """Counters of what reading the corpus kept, skipped and repaired."""

    documents: int = 0
    lines: int = 0
    bytes: int = 0
    empty_lines_skipped: int = 0
    empty_documents_skipped: int = 0
    invalid_utf8_replaced: int = 0
    """Invalid UTF-8 byte sequences replaced by U+FFFD."""

    def add(self, other: "CorpusStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(frozen=True)
class Source:
    """One resolved corpus source."""

    kind: str  # "text" | "jsonl" | "json" (one JSON array) | "csv" | "parquet" | "hub" | "task"
    location: str  # file path, Hub name[:config], or a task (GLUE name or task YAML)
    task_dir: str | None = None
    """For a task: the official GLUE distribution (data.task_dir); None: the Hub."""

    def fingerprint(self) -> str:
        """Identity of the source's content: path, size and mtime for files (as make
        does), the name for Hub datasets, the task's files for a task."""
        if self.kind == "hub":
            return f"hub:{self.location}"
        if self.kind == "task":
            return f"task:{json.dumps(self.task_source().fingerprint())}"
        st = os.stat(self.location)
        return f"{self.kind}:{os.path.realpath(self.location)}:{st.st_size}:{st.st_mtime_ns}"

    def size_bytes(self) -> int | None:
        return None if self.kind in ("hub", "task") else os.path.getsize(self.location)

    def task_source(self):
        """The task behind a ``task:`` source (overture.tasks.TaskSource)."""
        from ..tasks import load_task

        return load_task(self.location, self.task_dir)


def resolve_sources(corpus: list[str], cache_dir: Path,
                    task_dir: str | None = None) -> list[Source]:
    """Expand the recipe's ``data.corpus`` entries into concrete sources; ``task:NAME``
    (a GLUE task, its files under ``task_dir``, or a task YAML) is the task's training
    text.

    Raises ConfigError naming the entry when a path or glob matches nothing, when a path
    is a directory, when a file that should hold text looks binary, and when a task is
    unknown or its training file missing.
    """
    sources: list[Source] = []
    for entry in corpus:
        if entry == "default":
            sources.append(Source("text", str(default_corpus_path(cache_dir))))
        elif entry.startswith("hf:"):
            sources.append(Source("hub", entry[3:]))
        elif entry.startswith("task:"):
            source = Source("task", entry[5:], task_dir)
            try:
                task = source.task_source()
            except ConfigError as err:
                raise ConfigError(f"data.corpus: {entry!r}: {err}") from None
            train = task.task.split("train")
            if not task.has(train):
                raise ConfigError(f"data.corpus: {entry!r}: {task.path(train)} not found "
                                  f"(data.task_dir={task_dir!r})")
            sources.append(source)
        else:
            path = os.path.expanduser(entry)
            if not glob.has_magic(path) and os.path.isdir(path):
                raise ConfigError(f"data.corpus: {entry!r} is a directory; name its files "
                                  f"with a glob, e.g. {os.path.join(entry, '*.txt')!r}")
            matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                what = "no file matches the glob" if glob.has_magic(path) else "file not found"
                raise ConfigError(f"data.corpus: {what}: {entry!r}")
            for m in matches:
                kind = ROW_FORMATS.get(Path(m).suffix.lower(), "text")
                if kind != "parquet":
                    head = check_text_file(m, "data.corpus")
                    if kind == "jsonl" and head.lstrip().startswith(b"["):
                        kind = "json"  # one JSON array of rows, not JSON Lines
                sources.append(Source(kind, m))
    return sources


def check_text_file(path: str | os.PathLike, what: str) -> bytes:
    """The first bytes of ``path`` after checking that it holds UTF-8 text; every command
    that reads text files calls this. A program, archive, image or UTF-16 file would
    otherwise be "read" as text (every invalid byte replaced): refuse a file whose start
    has NUL bytes or is largely not UTF-8 (Latin-1 text has a few invalid bytes, which
    are repaired and counted). ``what`` names the option or key in the message."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - _count_literal_fffd(head)
    reason = "NUL bytes" if b"\0" in head else f"{bad} invalid UTF-8 sequences"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        reason = "a UTF-16 byte-order mark"
    if reason.startswith("a UTF-16") or b"\0" in head or bad > max(1, 0.3 * len(text)):
        raise ConfigError(f"{what}: {path} looks like a binary file, not text ({reason} "
                          f"in its first {len(head)} bytes); text files must be UTF-8 "
                          "(convert UTF-16 first), JSONL, CSV/TSV or Parquet")
    return head


def iter_documents(source: Source, text_column: str, hf_split: str,
                   stats: CorpusStats) -> Iterator[list[str]]:
    """Yield the documents of one source, updating ``stats`` as it reads."""
    if source.kind == "text":
        yield from _iter_text_file(source.location, stats)
        return
    readers = {"jsonl": _iter_jsonl, "csv": _iter_csv}
    if source.kind == "task":  # each training example a document, its texts its lines
        task = source.task_source()
        rows = ("\n".join(texts) for texts in task.read(task.task.split("train")).texts)
    elif source.kind in readers:
        rows = readers[source.kind](source.location, text_column, stats)
    else:
        rows = _iter_rows(source, text_column, hf_split)
    for text in rows:
        raw = text if isinstance(text, str) else ("" if text is None else str(text))
        stats.bytes += len(raw.encode("utf-8", "surrogatepass"))
        lines = [ln.strip() for ln in raw.splitlines()]
        kept = [ln for ln in lines if ln]
        stats.empty_lines_skipped += len(lines) - len(kept)
        if kept:
            stats.documents += 1
            stats.lines += len(kept)
            yield kept
        else:
            stats.empty_documents_skipped += 1


def _decode(raw: bytes, stats: CorpusStats) -> str:
    """UTF-8 with invalid sequences replaced by U+FFFD and counted (a U+FFFD already in
    the file is not counted)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.invalid_utf8_replaced += text.count("\ufffd") - _count_literal_fffd(raw)
        return text


def _iter_text_file(path: str, stats: CorpusStats) -> Iterator[list[str]]:
    doc: list[str] = []
    after_text = False  # a blank line right after text ends a document; others are skipped
    with _open_utf8(path) as f:
        for raw in f:
            stats.bytes += len(raw)
            line = _decode(raw, stats).strip()
            if line:
                after_text = True
                doc.append(line)
                continue
            if not after_text:  # leading, repeated or trailing blank (whitespace-only) lines
                stats.empty_lines_skipped += 1
            after_text = False
            if doc:
                stats.documents += 1
                stats.lines += len(doc)
                yield doc
                doc = []
        if doc:
            stats.documents += 1
            stats.lines += len(doc)
            yield doc


def _open_utf8(path: str):
    """The file in binary, past a UTF-8 byte-order mark (editors on Windows write one; it
    would otherwise start the first line, the JSON object or the CSV header)."""
    f = open(path, "rb")
    if f.read(3) != codecs.BOM_UTF8:
        f.seek(0)
    return f


def _count_literal_fffd(raw: bytes) -> int:
    return raw.count("\ufffd".encode("utf-8"))


def _missing_column(where: str, text_column: str, columns) -> ConfigError:
    return ConfigError(f"{where}: no column {text_column!r} (columns: "
                       f"{', '.join(map(str, columns))}); set data.text_column")


def _iter_jsonl(path: str, text_column: str, stats: CorpusStats) -> Iterator[object]:
    """JSON Lines read line by line with the standard library, which (unlike the Arrow
    reader) can say which line is malformed, and whose input we decode ourselves."""
    first = True
    with _open_utf8(path) as f:
        for number, raw in enumerate(f, 1):
            line = _decode(raw, stats)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}, line {number}, column {err.colno}: not valid "
                                  f"JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}, line {number}: expected a JSON object with a "
                                  f"{text_column!r} field, got {type(row).__name__}")
            if first and text_column not in row:
                raise _missing_column(path, text_column, row)
            first = False
            yield row.get(text_column)


def _iter_csv(path: str, text_column: str, stats: CorpusStats) -> Iterator[object]:
    """CSV / TSV with the standard library's reader over our decoded lines, so invalid
    UTF-8 is replaced and counted like in text files. CSV: quoted fields (which may span
    lines); TSV has no quoting: a ``"`` is text and each line is one row."""
    csv.field_size_limit(2**31 - 1)  # a whole document may sit in one cell (default: 128 KB)
    tsv = path.lower().endswith(".tsv")
    with _open_utf8(path) as f:
        reader = csv.DictReader((_decode(raw, stats) for raw in f),
                                **({"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv
                                   else {"delimiter": ","}))
        try:
            if reader.fieldnames is None:  # an empty file
                return
            if text_column not in reader.fieldnames:
                raise _missing_column(path, text_column, reader.fieldnames)
            for row in reader:
                if None in row:  # DictReader's place for fields beyond the header's
                    raise ConfigError(
                        f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])}"
                        f" fields, more than the header's {len(reader.fieldnames)}"
                        + (" (a tab inside a text?)" if tsv else " (quote a text with commas)"))
                yield row[text_column]
        except csv.Error as err:
            raise ConfigError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _iter_rows(source: Source, text_column: str, hf_split: str) -> Iterator[object]:
    """Rows of a Parquet file, a JSON array file or a Hub dataset, through `datasets`."""
    import datasets

    if source.kind == "hub":
        name, _, config = source.location.partition(":")
        ds = datasets.load_dataset(name, config or None, split=hf_split, streaming=True)
        where = f"Hub dataset {source.location!r}"
    else:
        ds = datasets.load_dataset(source.kind, data_files=[source.location], split="train",
                                   streaming=True)
        where = source.location
    rows = iter(ds)
    first = True
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except ValueError as err:  # Arrow / JSON / decoding errors are ValueErrors
            if source.kind == "hub":
                raise
            raise ConfigError(f"{where}: cannot be read as {source.kind}: {err}") from err
        if first and text_column not in row:
            raise _missing_column(where, text_column, row)
        first = False
        yield row[text_column]


# --------------------------------------------------------------------------- default corpus


def default_corpus_path(cache_dir: Path) -> Path:
    """The embedded default corpus: English prose from the docstrings of the running
    Python's standard library, extracted once into the cache (a few MB)."""
    tag = f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    path = Path(cache_dir) / "default-corpus" / f"stdlib-docstrings-{tag}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            for doc in stdlib_docstring_documents():  # a half-written corpus is never seen
                out.write("\n".join(doc) + "\n\n")
    return path


def stdlib_docstring_documents(min_words: int = 12) -> Iterator[list[str]]:
    """Yield one document per module / class / function docstring of the standard library.

    Docstrings are parsed with ``ast`` (nothing is imported, so no module runs). Each
    paragraph becomes one line; paragraphs that look like code (doctests, indented blocks,
    few letters) are dropped.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
            "turtledemo", "ensurepip", "venv"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if doc:
                paragraphs = _prose_paragraphs(doc, min_words)
                if paragraphs:
                    yield paragraphs


def _prose_paragraphs(doc: str, min_words: int) -> list[str]:
    kept = []
    for block in doc.split("\n\n"):
        lines = block.splitlines()
        if not lines or any(ln.startswith((" ", "\t", ">>>", "...")) for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        words = text.split()
        letters = sum(ch.isalpha() or ch == " " for ch in text)
        if len(words) >= min_words and letters >= 0.85 * len(text):
            kept.append(text)
    return kept


def corpus_fingerprint(sources: list[Source]) -> str:
    """One hash over every source's identity, in order."""
    h = hashlib.sha256()
    for s in sources:
        h.update(s.fingerprint().encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
