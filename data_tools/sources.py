"""Document sources for the data tools: local parquet / jsonl / txt files, and FineWeb on the hub.

A source is an ordered list of files, each yielding its documents (str) in a fixed order, so the
global document index is a stable position: `stream(source, start)` restarts exactly at document
`start`, which is what makes an interrupted preparation resumable. Files whose document counts
are already known (recorded by an earlier run) are skipped without being opened, so a resumed
hub run does not fetch the files it has finished.

File kinds, by name:
    *.parquet            FineWeb's schema: a string column `text` (other columns are ignored)
    *.jsonl, *.jsonl.gz  one JSON object per line with a string field `text`; blank lines skipped
    *.txt, *.txt.gz      the whole file is one document (UTF-8)

The hub path lists the dataset repository once (`list_hub_files`, with the file selection in the
pure function `hub_files`) and downloads each parquet with `huggingface_hub.hf_hub_download`
(resumable) when the stream reaches it, fetching the next file in the background meanwhile.
huggingface_hub is imported lazily: only the hub path needs it (`pip install 'llmc[data]'`).

Each reader is a generator that yields the documents and returns the file's document count
(skipped ones included). Every problem is a `SourceError` whose message is "<where>: <problem>; <fix>".
"""
from __future__ import annotations

import contextlib
import glob as globlib
import gzip
import json
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

HUB_REPOS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
SAMPLES = ("10BT", "100BT", "350BT")
KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".jsonl.gz": "jsonl",
         ".txt": "txt", ".txt.gz": "txt"}
_SOURCE_FIX = "give .parquet, .jsonl or .txt files, a directory of them, or a glob"


class SourceError(ValueError):
    """A source that cannot be read; the message is '<where>: <problem>; <fix>'."""


def file_kind(path) -> str | None:
    """'parquet' | 'jsonl' | 'txt' from the file name, None for anything else."""
    name = Path(path).name.lower()
    for suffix, kind in KINDS.items():
        if name.endswith(suffix):
            return kind
    return None


def resolve_paths(specs: Iterable[str]) -> list:
    """--source arguments (files, directories, globs) -> the ordered list of files to read."""
    paths = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_file():
            if file_kind(path) is None:
                raise SourceError(f"{spec}: unsupported file type; {_SOURCE_FIX}")
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p))
            if not found:
                raise SourceError(f"{spec}: directory holds no .parquet/.jsonl/.txt files; "
                                  f"{_SOURCE_FIX}")
        elif globlib.has_magic(str(path)):
            found = sorted(Path(p) for p in globlib.glob(str(path), recursive=True)
                           if Path(p).is_file() and file_kind(p))
            if not found:
                raise SourceError(f"{spec}: the glob matches no .parquet/.jsonl/.txt files; "
                                  f"{_SOURCE_FIX}")
        else:
            raise SourceError(f"{spec}: no such file or directory; {_SOURCE_FIX}")
        paths.extend(found)
    if not paths:
        raise SourceError(f"--source: nothing given; {_SOURCE_FIX}")
    return paths


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


@contextlib.contextmanager
def _text_read_errors(path: Path):
    """Turn a text file's decoding and I/O errors into a SourceError naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); "
                          "convert the file to UTF-8") from None
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot be read ({e}); check the file") from None


def parquet_documents(path: Path, skip: int = 0, batch_size: int = 1024) -> Iterator[str]:
    """The `text` column of a parquet file, from row `skip` on (whole row groups are skipped)."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: not a readable parquet file ({e}); "
                          "re-download or re-export it") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise SourceError(f"{path}: no 'text' column (columns: {', '.join(schema.names)}); "
                          "parquet sources need FineWeb's schema, a string column named text")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(f"{path}: column 'text' has type {kind}, not string; "
                          "store the documents as a string column named text")
    first, row = 0, 0  # first row group to read, and the row it starts at
    while first < pf.num_row_groups and row + pf.metadata.row_group(first).num_rows <= skip:
        row += pf.metadata.row_group(first).num_rows
        first += 1
    total = pf.metadata.num_rows
    if first == pf.num_row_groups:
        return total
    skip -= row
    groups = list(range(first, pf.num_row_groups))
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=["text"]):
        column = batch.column(0)
        if column.null_count:
            raise SourceError(f"{path}: {column.null_count} null value(s) in column 'text' near "
                              f"row {row}; drop or fill the null documents")
        texts = column.to_pylist()
        row += len(texts)
        if skip >= len(texts):
            skip -= len(texts)
            continue
        yield from texts[skip:]
        skip = 0
    return total


def jsonl_documents(path: Path, skip: int = 0) -> Iterator[str]:
    """The `text` field of each non-blank line, from document `skip` on."""
    n = 0
    with _text_read_errors(path), _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if n < skip:  # validated by the run that recorded this position
                n += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line "
                                  "must be one JSON object with a \"text\" string") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise SourceError(f"{path}:{lineno}: no \"text\" string field; each line "
                                  "must be one JSON object with a \"text\" string")
            n += 1
            yield obj["text"]
    return n


def txt_documents(path: Path, skip: int = 0) -> Iterator[str]:
    """The whole file as one document (nothing when skip >= 1)."""
    if skip >= 1:
        return 1
    with _text_read_errors(path), _open_text(path) as f:
        text = f.read()
    yield text
    return 1


_READERS = {"parquet": parquet_documents, "jsonl": jsonl_documents, "txt": txt_documents}


def file_documents(path: Path, skip: int = 0) -> Iterator[str]:
    """Documents of one local file of any supported kind, from document `skip` on."""
    return _READERS[file_kind(path)](path, skip)


class LocalSource:
    """Local files in a fixed order (see `resolve_paths`)."""

    def __init__(self, paths: list):
        self.paths = [Path(p) for p in paths]
        self.names = [str(p.resolve()) for p in self.paths]

    def identity(self) -> dict:
        """What a resumed run must match: the files, in order, with their sizes."""
        return {"kind": "local", "files": [[n, p.stat().st_size]
                                           for n, p in zip(self.names, self.paths)]}

    def documents(self, i: int, skip: int = 0) -> Iterator[str]:
        return file_documents(self.paths[i], skip)

    def estimate(self):
        """("documents", total) when cheap to know (parquet footers, txt files), else None."""
        total = 0
        for p in self.paths:
            kind = file_kind(p)
            if kind == "txt":
                total += 1
            elif kind == "parquet":
                try:
                    total += pq.ParquetFile(p).metadata.num_rows
                except (pa.ArrowException, OSError):
                    return None  # the reader reports it properly when it gets there
            else:
                return None
        return ("documents", total)


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise SourceError("huggingface_hub is not installed: it is needed to download FineWeb; "
                          "pip install 'llmc[data]' (or pass --source with local files)") from None
    return huggingface_hub


def hub_files(listing: Iterable[str], sample: str) -> list:
    """The parquet files of one sample (`sample/<N>BT/*.parquet`) in a repo listing, sorted."""
    if sample not in SAMPLES:
        raise SourceError(f"--sample {sample}: unknown sample; choose one of {', '.join(SAMPLES)}")
    prefix = f"sample/{sample}/"
    files = sorted(f for f in listing if f.startswith(prefix) and f.endswith(".parquet"))
    if not files:
        raise SourceError(f"{prefix}: no parquet files in the repository listing; "
                          "check --dataset/--sample (or pass --source with local files)")
    return files


def list_hub_files(dataset: str, sample: str, api=None) -> list:
    """Ask the hub for the repository's files and select the sample's parquet files."""
    if dataset not in HUB_REPOS:
        raise SourceError(f"--dataset {dataset}: unknown; choose one of {', '.join(HUB_REPOS)}")
    repo = HUB_REPOS[dataset]
    if api is None:
        api = _hf().HfApi()
    try:
        listing = api.list_repo_files(repo, repo_type="dataset")
    except Exception as e:  # noqa: BLE001 - network / auth errors of any client library
        raise SourceError(f"{repo}: could not list the repository on the Hugging Face hub "
                          f"({type(e).__name__}: {e}); check the network (or HF_TOKEN), or "
                          "pass --source with local files") from None
    return hub_files(listing, sample)


class HubSource:
    """FineWeb parquet files on the hub, downloaded when reached (the next one in background)."""

    def __init__(self, dataset: str, sample: str, files: list, download_dir=None,
                 download: Callable | None = None):
        self.dataset, self.sample, self.repo = dataset, sample, HUB_REPOS[dataset]
        self.names = list(files)
        self.download_dir = download_dir
        self._download = download
        self._pending = {}  # file index -> (thread, result box)

    def identity(self) -> dict:
        return {"kind": "hub", "repo": self.repo, "sample": self.sample, "files": self.names}

    def estimate(self):
        """The sample's nominal size in GPT-2 tokens (10BT = 10e9)."""
        return ("tokens", int(self.sample[:-2]) * 10**9)

    def _fetch_now(self, i: int) -> Path:
        download = self._download or _hf().hf_hub_download
        kwargs = {"repo_type": "dataset"}
        if self.download_dir is not None:
            kwargs["local_dir"] = str(self.download_dir)
        try:
            return Path(download(self.repo, self.names[i], **kwargs))
        except Exception as e:  # noqa: BLE001 - network / auth errors of any client library
            raise SourceError(f"{self.repo}/{self.names[i]}: download failed "
                              f"({type(e).__name__}: {e}); check the network and rerun the "
                              "same command (downloads and finished shards resume)") from None

    def _start(self, i: int) -> None:
        """Begin downloading file i in a daemon thread (an exit does not wait for it)."""
        if i >= len(self.names) or i in self._pending:
            return
        box = {}

        def work():
            try:
                box["path"] = self._fetch_now(i)
            except SourceError as e:
                box["error"] = e
        thread = threading.Thread(target=work, name=f"download-{i}", daemon=True)
        thread.start()
        self._pending[i] = (thread, box)

    def fetch(self, i: int) -> Path:
        """The local path of file i, downloading it if needed; starts fetching file i + 1."""
        self._start(i)
        self._start(i + 1)
        thread, box = self._pending.pop(i)
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["path"]

    def documents(self, i: int, skip: int = 0) -> Iterator[str]:
        return parquet_documents(self.fetch(i), skip)


def stream(source, start: int = 0, known_counts=(), on_file_done: Callable | None = None
           ) -> Iterator[str]:
    """Documents of `source` from global index `start` on.

    known_counts[i] is the number of documents of file i when an earlier run recorded it; such
    files lying wholly before `start` are skipped unopened. on_file_done(i, n) is called when
    file i is exhausted, with its document count n.
    """
    base = 0  # global index of file i's first document
    for i in range(len(source.names)):
        if i < len(known_counts) and base + known_counts[i] <= start:
            base += known_counts[i]
            continue
        n = yield from source.documents(i, max(0, start - base))
        if on_file_done is not None:
            on_file_done(i, n)
        base += n
