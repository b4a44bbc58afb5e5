"""The spool and journal of ``cxr-edge dicom-node`` (:mod:`cxr_edge.dicomnode`): files written durably, and an
SQLite journal of every instance (:data:`SCHEMA`), printed by ``cxr-edge journal``."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

SCHEMA = """CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT UNIQUE,  -- NULL for a refused association
    received TEXT,                 -- UTC, ISO 8601 with milliseconds
    calling_ae TEXT, study_uid TEXT, series_uid TEXT, sop_class_uid TEXT,
    status TEXT,                   -- received | waiting | sent | unreadable | refused
    label TEXT,                    -- NULL when refused by the gate or unreadable
    probabilities TEXT,            -- JSON {class: p}
    reason TEXT,                   -- gate refusal, why unreadable, why the association was refused
    warning TEXT,                  -- the record's warning, if any
    result_uids TEXT,              -- JSON list of the result objects' SOP Instance UIDs
    sent TEXT,                     -- UTC time the destination confirmed the last result object
    attempts INTEGER DEFAULT 0, last_error TEXT,
    record TEXT                    -- the classification record (cxr-edge classify --json, without path)
)"""
PENDING = ("received", "waiting")


class NodeError(Exception):
    """A problem with the node's options or environment (bad --send-to, unusable spool, model)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temporary file, fsync, rename, fsync the folder)."""
    # one temporary per writer (the same instance may arrive on two associations at once), removed when the
    # write fails (a full disk stays full otherwise)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The SQLite journal (one connection, serialized by a lock; every change committed at once)."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)

    def _run(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def received(self, uid: str, calling_ae: str, study: str, series: str, sop_class: str) -> None:
        self._run("INSERT INTO journal (sop_instance_uid, received, calling_ae, study_uid, series_uid, sop_class_uid,"
                  " status) VALUES (?,?,?,?,?,?,'received') ON CONFLICT(sop_instance_uid) DO UPDATE SET "
                  "received=excluded.received, calling_ae=excluded.calling_ae, study_uid=excluded.study_uid, "
                  "series_uid=excluded.series_uid, sop_class_uid=excluded.sop_class_uid, status='received', "
                  "label=NULL, probabilities=NULL, reason=NULL, warning=NULL, result_uids=NULL, sent=NULL, "
                  "attempts=0, last_error=NULL, record=NULL", (uid, now(), calling_ae, study, series, sop_class))

    def classified(self, uid: str, record: dict, result_uids: list) -> None:
        probs = record.get("probabilities")
        self._run("UPDATE journal SET status='waiting', label=?, probabilities=?, reason=?, warning=?, result_uids=?,"
                  " record=? WHERE sop_instance_uid=?",
                  (record.get("label"), None if probs is None else json.dumps(probs), record.get("reason"),
                   record.get("warning"), json.dumps(result_uids), json.dumps(record), uid))

    def unreadable(self, uid: str, reason: str, record: Optional[dict] = None) -> None:
        self._run("UPDATE journal SET status='unreadable', reason=?, record=? WHERE sop_instance_uid=?",
                  (reason, None if record is None else json.dumps(record), uid))

    def failed_try(self, uid: str, error: str) -> None:
        self._run("UPDATE journal SET attempts=attempts+1, last_error=? WHERE sop_instance_uid=?", (error, uid))

    def sent(self, uid: str) -> None:
        self._run("UPDATE journal SET status='sent', sent=?, attempts=attempts+1, last_error=NULL "
                  "WHERE sop_instance_uid=?", (now(), uid))

    def refused(self, calling_ae: str, reason: str) -> None:
        self._run("INSERT INTO journal (received, calling_ae, status, reason) VALUES (?,?,'refused',?)",
                  (now(), calling_ae, reason))

    def status(self, uid: str) -> Optional[str]:
        rows = self._run("SELECT status FROM journal WHERE sop_instance_uid=?", (uid,))
        return rows[0][0] if rows else None

    def pending(self) -> list[tuple[str, str]]:
        return self._run("SELECT sop_instance_uid, status FROM journal WHERE status IN (?,?) ORDER BY id", PENDING)

    def rows(self) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM journal ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Spool:
    """``in/<key>.dcm``: received instances; ``out/<key>/1-sr.dcm``, ``2-sc.dcm``: their results (``key``: the
    SOP Instance UID, or its sha1 when it is not a plain UID); ``journal.sqlite``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        try:
            for sub in ("in", "out"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
                for stale in (self.root / sub).rglob("*.tmp"):  # a write a killed run left half done
                    stale.unlink()
            self.journal = Journal(self.root / "journal.sqlite")
        except (OSError, sqlite3.Error) as exc:
            raise NodeError(f"cannot use the spool {self.root}: {exc}") from None

    @staticmethod
    def key(uid: str) -> str:
        return uid if re.fullmatch(r"[0-9][0-9.]{0,63}", uid) else hashlib.sha1(uid.encode()).hexdigest()

    def incoming(self, uid: str) -> Path:
        return self.root / "in" / f"{self.key(uid)}.dcm"

    def outgoing(self, uid: str) -> Path:
        return self.root / "out" / self.key(uid)

    def results(self, uid: str) -> list[Path]:
        folder = self.outgoing(uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def remove(self, uid: str) -> None:
        for path in self.results(uid) + [self.incoming(uid)]:
            path.unlink(missing_ok=True)
        try:
            self.outgoing(uid).rmdir()
        except OSError:
            pass


def print_journal(spool: Path, as_json: bool, echo: Callable[[str], None] = print) -> None:
    """The journal as a table, or JSON Lines (one object per row, JSON columns decoded)."""
    path = Path(spool) / "journal.sqlite"
    if not path.is_file():
        raise NodeError(f"no journal at {path}")
    journal = Journal(path)
    try:
        rows = journal.rows()
    finally:
        journal.close()
    for row in rows:
        if as_json:
            for k in ("probabilities", "result_uids", "record"):
                row[k] = None if row[k] is None else json.loads(row[k])
            echo(json.dumps(row))
        else:
            what = row["label"] or row["reason"] or ""
            if row["label"] and row["probabilities"]:
                what += " " + " ".join(f"{k}={v:.3f}" for k, v in json.loads(row["probabilities"]).items())
            echo(f"{row['received'] or '':<29} {row['calling_ae'] or '':<16} {row['sop_instance_uid'] or '-':<64} "
                 f"{row['status']:<10} {what}" + (f" (sent {row['sent']})" if row["sent"] else ""))
