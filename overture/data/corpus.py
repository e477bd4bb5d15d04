"""Corpus sources: local files and globs, Hugging Face Hub datasets, the embedded default.

A *document* is a list of non-empty lines. In text files documents are separated by blank
(whitespace-only) lines; in JSONL / CSV / Parquet / Hub sources each row is a document
whose text is split on newlines. Everything streams: one document is in memory at a time.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from ..atomic import atomic_file
from ..config import ConfigError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".raw", ".tokens"}
ROW_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet"}


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

    kind: str  # "text" | "json" | "csv" | "parquet" | "hub"
    location: str  # file path, or Hub name[:config]

    def fingerprint(self) -> str:
        """Identity of the source's content: path, size and mtime for files (as make
        does), the name for Hub datasets."""
        if self.kind == "hub":
            return f"hub:{self.location}"
        st = os.stat(self.location)
        return f"{self.kind}:{os.path.realpath(self.location)}:{st.st_size}:{st.st_mtime_ns}"

    def size_bytes(self) -> int | None:
        return None if self.kind == "hub" else os.path.getsize(self.location)


def resolve_sources(corpus: list[str], cache_dir: Path) -> list[Source]:
    """Expand the recipe's ``data.corpus`` entries into concrete sources.

    Raises ConfigError naming the entry when a path or glob matches nothing.
    """
    sources: list[Source] = []
    for entry in corpus:
        if entry == "default":
            sources.append(Source("text", str(default_corpus_path(cache_dir))))
        elif entry.startswith("hf:"):
            sources.append(Source("hub", entry[3:]))
        else:
            path = os.path.expanduser(entry)
            matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                what = "no file matches the glob" if glob.has_magic(path) else "file not found"
                raise ConfigError(f"data.corpus: {what}: {entry!r}")
            for m in matches:
                suffix = Path(m).suffix.lower()
                sources.append(Source(ROW_FORMATS.get(suffix, "text"), m))
    return sources


def iter_documents(source: Source, text_column: str, hf_split: str,
                   stats: CorpusStats) -> Iterator[list[str]]:
    """Yield the documents of one source, updating ``stats`` as it reads."""
    if source.kind == "text":
        yield from _iter_text_file(source.location, stats)
        return
    for text in _iter_rows(source, text_column, hf_split):
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


def _iter_text_file(path: str, stats: CorpusStats) -> Iterator[list[str]]:
    doc: list[str] = []
    blank_run = 0
    with open(path, "rb") as f:
        for raw in f:
            stats.bytes += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats.invalid_utf8_replaced += line.count("\ufffd") - _count_literal_fffd(raw)
            line = line.strip()
            if line:
                if blank_run > 1:  # extra blank lines between documents
                    stats.empty_lines_skipped += blank_run - 1
                blank_run = 0
                doc.append(line)
                continue
            blank_run += 1
            if doc:
                stats.documents += 1
                stats.lines += len(doc)
                yield doc
                doc = []
        if doc:
            stats.documents += 1
            stats.lines += len(doc)
            yield doc


def _count_literal_fffd(raw: bytes) -> int:
    return raw.count("\ufffd".encode("utf-8"))


def _iter_rows(source: Source, text_column: str, hf_split: str) -> Iterator[object]:
    import datasets

    if source.kind == "hub":
        name, _, config = source.location.partition(":")
        ds = datasets.load_dataset(name, config or None, split=hf_split, streaming=True)
        where = f"Hub dataset {source.location!r}"
    else:
        kwargs = {"delimiter": "\t"} if source.location.endswith(".tsv") else {}
        ds = datasets.load_dataset(source.kind, data_files=[source.location], split="train",
                                   streaming=True, **kwargs)
        where = source.location
    first = True
    for row in ds:
        if first and text_column not in row:
            raise ConfigError(f"{where}: no column {text_column!r} (columns: "
                              f"{', '.join(row)}); set data.text_column")
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
