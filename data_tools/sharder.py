"""Tokenize a stream of documents on every core into resumable token shards.

Output directory, for a name prefix such as "fineweb":
    <prefix>_val_000000.arrow, <prefix>_train_000001.arrow, ...   llmc.data.shards files
    <prefix>_progress.json   the finished shards and where each starts and ends (atomic rewrite
                             after every shard)
    <prefix>_summary.json    at the end: shards, tokens, documents, per-shard counts

Every document becomes [EOT] + encode_ordinary(text), EOT = <|endoftext|> = 50256. Shards hold
exactly `shard_size` tokens (the last one fewer); a document crossing a boundary continues in the
next shard, as in llm.c's fineweb.py. A boundary is therefore a position (document index, token
offset inside that document). The first shard is split "val", the others "train".

Resume: a rerun checks that the progress file was made with the same source, shard size and
prefix, checks each finished shard's footer, and restarts the document stream at the end of the
last good shard. Tokenization is deterministic, so the result equals an uninterrupted run, and
finished shards are neither re-read nor rewritten.

Parallelism: the main process reads documents and groups them into batches of ~1 MB of text;
`workers` processes tokenize batches, each returning one uint16 array and the per-document
lengths. At most 2 * workers batches are in flight, so memory stays bounded whatever the size
of the source (multiprocessing.Pool.imap would read the whole source ahead).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from llmc.data.shards import ShardError, read_meta, write_shard
from llmc.data.tokenizer import EOT, get_encoding

from data_tools.sources import stream

PROGRESS_FORMAT = "llmc-prepare-progress"
PROGRESS_VERSION = 1


class PrepareError(ValueError):
    """An output directory or option that cannot be used; '<where>: <problem>; <fix>'."""


def tokenize_batch(texts: list) -> tuple:
    """Documents -> (tokens uint16 (sum of lengths,), lengths int64 (n,)), each led by EOT."""
    enc = get_encoding()
    ids = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for j, text in enumerate(texts):
        doc = enc.encode_ordinary(text)
        ids.append(EOT)
        ids.extend(doc)
        lengths[j] = len(doc) + 1
    return np.array(ids, dtype=np.uint16), lengths


def _worker_init(parent: int) -> None:
    """Workers ignore Ctrl-C (the main process handles it and shuts the pool down) and die
    with the main process however it ends: kill -9 runs no cleanup, so each worker asks the
    kernel for SIGKILL when its parent dies (Linux) and also watches its parent's PID."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if os.getppid() != parent:  # the parent died before this worker got here
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)  # reparented: the main process is gone, so nobody will read our results


def batches(docs: Iterator[str], max_docs: int = 1024, max_chars: int = 1 << 20):
    """Group documents into lists of at most max_docs documents / about max_chars characters."""
    batch, chars = [], 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenized(batch_iter, workers: int):
    """tokenize_batch over batch_iter, in order, on `workers` processes (1: in this process)."""
    if workers <= 1:
        for batch in batch_iter:
            yield tokenize_batch(batch)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        pending = deque()
        for batch in batch_iter:
            pending.append(pool.submit(tokenize_batch, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """Documents/s, tokens/s and ETA: a tqdm bar when tqdm is installed, else a line every 10 s."""

    def __init__(self, label: str, estimate, done_docs: int, done_tokens: int, log=sys.stderr,
                 interval: float = 10.0):
        self.label, self.log, self.interval = label, log, interval
        self.unit, self.total = estimate if estimate else (None, None)
        self.docs, self.tokens = done_docs, done_tokens
        self.t0 = self.last = time.monotonic()
        self.docs0, self.tokens0 = done_docs, done_tokens
        self.bar = None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        unit = "tok" if self.unit == "tokens" else "doc"
        self.bar = tqdm(total=self.total, initial=self._done(), unit=unit, unit_scale=True,
                        desc=label, file=log, mininterval=1.0, dynamic_ncols=True)

    def _done(self) -> int:
        return self.tokens if self.unit == "tokens" else self.docs

    def rates(self) -> tuple:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return (self.docs - self.docs0) / dt, (self.tokens - self.tokens0) / dt

    def update(self, docs: int, tokens: int, shard: int) -> None:
        before = self._done()
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        dps, tps = self.rates()
        if self.bar is not None:
            self.bar.update(self._done() - before)
            self.bar.set_postfix_str(f"{dps:,.0f} docs/s {tps / 1e6:.2f}M tok/s shard {shard}",
                                     refresh=False)
        elif now - self.last >= self.interval:
            self.last = now
            eta = "?"
            rate = tps if self.unit == "tokens" else dps
            if self.total and rate > 0:
                eta = time.strftime("%H:%M:%S", time.gmtime(max(self.total - self._done(), 0)
                                                            / rate))
            print(f"{self.label}: {self.docs:,} docs ({dps:,.0f}/s)  {self.tokens / 1e6:,.1f}M "
                  f"tokens ({tps / 1e6:.2f}M/s)  shard {shard}  ETA {eta}", file=self.log,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write_json(path: Path, obj) -> None:
    """Atomic JSON write: a temporary file in the same directory, fsync, rename."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fresh_state(identity: dict) -> dict:
    return {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "identity": identity,
            "file_documents": [], "shards": [], "complete": False}


def load_state(out_dir: Path, prefix: str, identity: dict, log=sys.stderr) -> dict:
    """The progress of an earlier run in out_dir (checked against identity), or a fresh one."""
    path = out_dir / f"{prefix}_progress.json"
    if not path.exists():
        existing = sorted(out_dir.glob(f"{prefix}_*.arrow"))
        if existing:
            raise PrepareError(f"{out_dir}: holds {len(existing)} {prefix}_*.arrow shard(s) but "
                               f"no {path.name} to resume from; choose an empty --out directory "
                               "or remove those shards")
        return _fresh_state(identity)
    redo = (f"delete it and the {prefix}_*.arrow shards beside it to start over, "
            "or choose another --out")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: corrupt progress file ({e}); {redo}") from None
    if not isinstance(state, dict) or state.get("format") != PROGRESS_FORMAT:
        raise PrepareError(f"{path}: not an llmc progress file; {redo}")
    if state.get("version") != PROGRESS_VERSION:
        raise PrepareError(f"{path}: progress version {state.get('version')}, this llmc writes "
                           f"{PROGRESS_VERSION}; {redo}")
    old = state["identity"]
    if old != identity and not state["shards"]:
        return _fresh_state(identity)  # an earlier attempt finished no shard: nothing to keep
    if old != identity:
        keys = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise PrepareError(f"{path}: made with a different {', '.join(keys)} (before: "
                           f"{', '.join(f'{k}={old.get(k)!r}'[:200] for k in keys)}); rerun with "
                           f"the same flags to resume, or {redo}")
    kept = []
    for rec in state["shards"]:
        try:
            meta = read_meta(out_dir / rec["name"])
        except ShardError as e:
            print(f"note: {e}: redone", file=log)
            break
        if meta["num_tokens"] != rec["tokens"] or meta["split"] != rec["split"]:
            print(f"note: {rec['name']} does not match {path.name}: redone", file=log)
            break
        kept.append(rec)
    if len(kept) < len(state["shards"]):
        state["complete"] = False
    state["shards"] = kept
    return state


def summarize(state: dict) -> dict:
    """The summary JSON: totals and per-shard counts."""
    shards = [{k: rec[k] for k in ("name", "split", "tokens", "documents")}
              for rec in state["shards"]]
    return {"identity": state["identity"], "shards": shards,
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
            "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train")}


def prepare(source, out_dir, prefix: str, shard_size: int = 100_000_000, workers: int = 1,
            identity: dict | None = None, log=sys.stderr) -> dict:
    """Tokenize `source` (see data_tools.sources) into shards in out_dir; return the summary."""
    if shard_size < 1:
        raise PrepareError(f"--shard-size {shard_size}: must be a positive number of tokens; "
                           "use e.g. 100000000")
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"{out_dir}: cannot create the output directory ({e}); "
                           "choose a writable --out") from None
    identity = {"prefix": prefix, "shard_size": int(shard_size), "tokenizer": "gpt2",
                "source": identity if identity is not None else source.identity()}
    identity = json.loads(json.dumps(identity))  # the form it takes in the progress file
    state = load_state(out_dir, prefix, identity, log)
    progress_path = out_dir / f"{prefix}_progress.json"
    summary_path = out_dir / f"{prefix}_summary.json"
    if state["complete"]:
        summary = summarize(state)
        if not summary_path.exists():
            _write_json(summary_path, summary)
        print(f"{out_dir}: already complete ({len(summary['shards'])} shards, "
              f"{summary['tokens']:,} tokens); see {summary_path.name}", file=log)
        return summary
    for stale in [*out_dir.glob(f"{prefix}_*.arrow.tmp-*"), *out_dir.glob(f"{prefix}_*.json.tmp-*")]:
        stale.unlink()  # left by a killed writer
    if not progress_path.exists():
        # Written before the first shard, so that a crash right after that shard leaves a
        # progress file to resume from rather than a shard that makes the rerun refuse.
        _write_json(progress_path, state)
    shards, known = state["shards"], state["file_documents"]
    start_doc, start_off = shards[-1]["end"] if shards else (0, 0)
    if shards:
        print(f"resuming after {len(shards)} finished shard(s), at document {start_doc:,}",
              file=log)

    def file_done(i, n):
        if i == len(known):
            known.append(n)

    progress = Progress(prefix, source.estimate(), start_doc, len(shards) * shard_size, log)
    buf = np.empty(shard_size, dtype=np.uint16)
    fill, shard_start = 0, [start_doc, start_off]

    def finish(end):
        nonlocal fill, shard_start
        index = len(shards)
        split = "val" if index == 0 else "train"
        name = f"{prefix}_{split}_{index:06d}.arrow"
        tokens = buf[:fill]
        write_shard(out_dir / name, tokens, split)
        shards.append({"name": name, "split": split, "tokens": int(fill),
                       "documents": int(np.count_nonzero(tokens == EOT)),
                       "start": shard_start, "end": end})
        _write_json(progress_path, state)
        fill, shard_start = 0, end

    doc, skip = start_doc, start_off
    try:
        docs = stream(source, start_doc, known, file_done)
        for tokens, lengths in tokenized(batches(docs), workers):
            bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=bounds[1:])
            p, skip = skip, 0
            fresh = len(tokens) - p
            while p < len(tokens):
                take = min(shard_size - fill, len(tokens) - p)
                buf[fill:fill + take] = tokens[p:p + take]
                fill, p = fill + take, p + take
                if fill == shard_size:
                    j = int(np.searchsorted(bounds, p, side="right")) - 1
                    finish([doc + j, int(p - bounds[j])])
            doc += len(lengths)
            progress.update(len(lengths), fresh, len(shards))
        if fill:
            finish([doc, 0])
    finally:
        progress.close()
    if not shards:
        raise PrepareError(f"{'/'.join(source.names[:3])}{' ...' if len(source.names) > 3 else ''}"
                           ": the source holds no documents; check --source")
    state["complete"] = True
    summary = summarize(state)
    _write_json(summary_path, summary)
    _write_json(progress_path, state)
    if len(shards) == 1:
        print(f"warning: all {summary['tokens']:,} tokens went into the validation shard and "
              "there is no training shard; use a smaller --shard-size", file=log)
    print(f"wrote {len(shards)} shard(s) ({summary['val_tokens']:,} val + "
          f"{summary['train_tokens']:,} train tokens, {summary['documents']:,} documents) "
          f"to {out_dir}", file=log)
    return summary
