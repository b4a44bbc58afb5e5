"""``cxr-edge dicom-node``: a DICOM application entity that a PACS routes studies to (extra ``cxr-edge[pacs]``:
pynetdicom, highdicom). Documentation for users: ``docs/pacs.md``.

A C-ECHO and C-STORE service class provider (pynetdicom) accepts every storage SOP class in every transfer
syntax. Each received instance is written to the spool, exactly as received (the Part 10 file pynetdicom
encodes from the association's data set: preamble, file meta, data set), flushed to disk with ``fsync`` and
journaled before its C-STORE is answered. Worker threads (``--workers``, one ``Classifier`` each, gate
included: the same records as ``cxr-edge classify --json``) classify spooled instances and write their result
objects (``cxr_edge.dicomresults``: a Comprehensive SR, and a Secondary Capture with the heatmap for a
labelled scan) into the spool; sender threads (at least ``SENDERS``, each with its own association) send them
with C-STORE to ``--send-to``. A spool entry (the received file and its results) is removed only after the
destination answered every result object with a success status; until then it waits, and an unreachable or
refusing destination is retried with exponential backoff shared by the senders (1 s doubling up to
``retry_max``), logged on every try. A node killed at any moment and started again on the same spool finishes
the work: instances journaled as received are classified, results waiting are sent. Result UIDs are derived from the source SOP Instance UID and the model's sha256, so a second send after
a crash replaces the first in the PACS instead of adding to it.

Answers (C-STORE status): 0x0000 when the instance is in the spool, whatever it holds (an object that cannot
be classified, e.g. no or truncated pixel data or an SR, is journaled as "unreadable" with the reason and gets
no result); 0xA700 (out of resources) when it could not be written to the spool (the sender keeps it and
retries). An association from a calling AE title not in ``allow`` is rejected (A-ASSOCIATE-RJ, permanent,
"calling AE title not recognized") and journaled as "refused". C-ECHO answers 0x0000.

The journal is an SQLite database, ``SPOOL/journal.sqlite``, one row per SOP instance (a resend updates its
row) plus one per refused association: see ``cxr_edge.dicomspool.SCHEMA``; ``cxr-edge journal`` prints it."""
from __future__ import annotations

import contextlib
import io
import logging
import queue
import re
import sqlite3
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from cxr_edge.dicomspool import NodeError, Spool, _fsync_write, now, print_journal  # noqa: F401 (the CLI's)
from cxr_edge.pixels import _reason

OK_STATUSES = {0x0000, 0xB000, 0xB007, 0xB006}  # success and the storage warnings (coercion, elements discarded)


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (ae title, host, port)."""
    m = re.fullmatch(r"([^@]{1,16})@(.+):(\d{1,5})", text.strip())
    if not m or not 0 < int(m.group(3)) < 65536:
        raise NodeError(f"--send-to {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
    return m.group(1), m.group(2).strip("[]"), int(m.group(3))


def _header(path: Path):
    """The data set of a spooled file, large values (pixel data) read only when used."""
    import pydicom

    return pydicom.dcmread(str(path), defer_size="4 KB")


def _tls_contexts(cert: Optional[str], key: Optional[str], ca: Optional[str]):
    """(server context or None, client context or None): TLS on the listening port with ``cert``/``key``
    (client certificates required when ``ca`` is given); TLS to the destination when ``ca`` is given (its
    certificate verified against ``ca``, ours presented when we have one)."""
    try:
        server = client = None
        if cert:
            server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            server.load_cert_chain(cert, key)
            if ca:
                server.load_verify_locations(ca)
                server.verify_mode = ssl.CERT_REQUIRED
        if ca:
            client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            if cert:
                client.load_cert_chain(cert, key)
        return server, client
    except (OSError, ssl.SSLError) as exc:
        raise NodeError(f"TLS: {exc}") from None


def _default_log(message: str) -> None:
    print(f"{now()} cxr-edge dicom-node: {message}", file=sys.stderr, flush=True)


SENDERS = 4  # at least this many sending threads
SEND_BATCH = 4  # result sets a sender takes for one association at most


class Node:
    """The node: ``start()`` listens and starts the workers and the sender, ``stop()`` ends them (work left
    stays in the spool)."""

    def __init__(self, spool: Path, send_to: str, ae_title: str = "CXREDGE", host: str = "127.0.0.1",
                 port: int = 11112, allow: tuple = (), workers: int = 1, model=None, backend=None, ood: bool = True,
                 allow_adults: bool = False, sc_jpeg: bool = True, tls_cert=None, tls_key=None, tls_ca=None, retry_max: float = 60.0,
                 log: Callable[[str], None] = _default_log):
        self.dest = parse_destination(send_to)
        self.ae_title, self.host, self.port, self.allow = ae_title, host, int(port), tuple(allow)
        self.retry_max, self.log = max(0.1, float(retry_max)), log
        self.sc_jpeg = bool(sc_jpeg)
        # senders, each its own association: the PACS stores several results at once (one waited on each in turn)
        self.senders = max(SENDERS, int(workers))
        self._sending: set = set()
        self._sending_lock = threading.Lock()
        # one back-off for all senders, none trying before _resume_at (each alone passed the same result sets on)
        self._delay, self._resume_at = 0.0, 0.0
        self.tls_server, self.tls_client = _tls_contexts(tls_cert, tls_key, tls_ca)
        self.spool = Spool(spool)
        self.classifiers = [self._classifier(model, backend, ood, allow_adults) for _ in range(max(1, int(workers)))]
        self.work: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.server = None

    @staticmethod
    def _classifier(model, backend, ood, allow_adults=False):
        from cxr_edge.bundle import BundleError
        from cxr_edge.classifier import Classifier
        from cxr_edge.engines import EngineError

        try:
            try:
                return Classifier(model, backend, threads=1, decode_threads=0, ood=ood, heatmaps=True,
                                  allow_adults=allow_adults)
            except BundleError as exc:
                if "class-activation" not in str(exc) and "cam" not in str(exc).lower():
                    raise
                return Classifier(model, backend, threads=1, decode_threads=0, ood=ood,  # no heatmaps in the SC
                                  allow_adults=allow_adults)
        except (BundleError, EngineError) as exc:
            raise NodeError(f"cannot load the model: {exc}") from None

    # -- receiving ---------------------------------------------------------------------------------------
    def _on_rejected(self, event) -> None:
        """Our A-ASSOCIATE-RJ: journaled and logged."""
        calling = str(event.assoc.requestor.ae_title).strip()
        reason = (f"calling AE title {calling!r} is not in --allow" if self.allow and calling not in self.allow
                  else "too many associations at once")
        self.log(f"association from {calling}@{event.assoc.requestor.address} refused: {reason}")
        self.spool.journal.refused(calling, reason)

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            data = event.encoded_dataset(include_meta=True)
            path = self.spool.incoming(uid)
            _fsync_write(path, data)
            study = series = ""
            try:
                ds = _header(path)
                study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
            except Exception:  # unreadable: journaled as such by the worker
                pass
            self.spool.journal.received(uid, calling, study, series, str(event.request.AffectedSOPClassUID))
        except (OSError, sqlite3.Error) as exc:
            self.log(f"cannot spool {uid} from {calling}: {exc}; answered 0xA700 (out of resources)")
            return 0xA700
        self.work.put(uid)
        return 0x0000

    # -- classifying ---------------------------------------------------------------------------------------
    def _worker(self, clf) -> None:
        while not self._stop.is_set():
            try:
                uid = self.work.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._process(clf, uid)
            except (OSError, sqlite3.Error, MemoryError) as exc:  # a full disk or memory: retried on the next start
                self.log(f"{uid}: not processed ({_reason(exc)})")
            except Exception as exc:  # it would fail the same way on every start: journaled with its reason
                with contextlib.suppress(OSError, sqlite3.Error):
                    self._unreadable(uid, f"no result made ({_reason(exc)})")

    def _process(self, clf, uid: str) -> None:
        from cxr_edge import dicomresults
        from cxr_edge.classifier import one_line
        from cxr_edge.preprocess import _open

        journal, path = self.spool.journal, self.spool.incoming(uid)
        if journal.status(uid) != "received" or not path.exists():
            return
        try:
            header = _header(path)
            missing = [k for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID")
                       if not header.get(k)]
        except Exception as exc:
            header, missing = None, [f"unreadable DICOM ({one_line(exc)})"]
        if missing:
            return self._unreadable(uid, f"no {', '.join(missing)}" if header is not None else missing[0])
        if header.get("ManufacturerModelName") == dicomresults.MODEL_NAME:
            return self._unreadable(uid, "a cxr-edge result object: not classified")
        if not any(k in header for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            name = getattr(header.SOPClassUID, "name", str(header.SOPClassUID))
            return self._unreadable(uid, f"not an image ({name} without pixel data)")
        result = next(iter(clf.classify_many([str(path)])))
        record = {k: v for k, v in result.to_dict().items() if k != "path"}
        if "error" in record or result.status == "error":
            return self._unreadable(uid, str(record.get("error", "cannot be classified")), record)
        uids = dicomresults.result_uids(header, clf.model.sha256)
        objects = [("1-sr.dcm", dicomresults.structured_report(header, record, uids))]
        if record.get("label") is not None:
            with _open(str(path)) as image:
                objects.append(("2-sc.dcm", dicomresults.secondary_capture(header, record, uids, image,
                                                                           getattr(result, "heatmap", None),
                                                                           jpeg=self.sc_jpeg)))
        out = self.spool.outgoing(uid)
        out.mkdir(exist_ok=True)
        for name, ds in objects:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            _fsync_write(out / name, buf.getvalue())
        journal.classified(uid, record, [str(ds.SOPInstanceUID) for _, ds in objects])
        self.outbox.put(uid)

    def _unreadable(self, uid: str, reason: str, record: Optional[dict] = None) -> None:
        self.log(f"{uid}: unreadable, no result sent: {reason}")
        self.spool.journal.unreadable(uid, reason, record)
        self.spool.remove(uid)

    # -- sending -------------------------------------------------------------------------------------------
    def _sender(self) -> None:
        while not self._stop.is_set():
            wait = self._resume_at - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, 0.2))
                continue
            batch = []
            try:  # a few result sets per association: the other senders take the rest
                batch.append(self.outbox.get(timeout=0.2))
                while len(batch) < SEND_BATCH:
                    batch.append(self.outbox.get_nowait())
            except queue.Empty:
                pass
            if batch and self._resume_at > time.monotonic():  # a try failed while this sender waited: back off
                for uid in batch:
                    self.outbox.put(uid)
                continue
            with self._sending_lock:  # a result set queued twice is sent by one sender only
                batch = [u for u in dict.fromkeys(batch) if u not in self._sending]
                self._sending.update(batch)
            if not batch:
                continue
            try:
                failed, error = self._send(batch)
            except Exception as exc:  # never end a sender: the result sets stay in the spool and are tried again
                failed, error = batch, f"not sent ({_reason(exc)})"
            finally:
                with self._sending_lock:
                    self._sending.difference_update(batch)
            for uid in failed:
                self.outbox.put(uid)
            with self._sending_lock:  # the back-off every sender keeps
                self._delay = delay = min(self.retry_max, max(1.0, self._delay * 2)) if failed else 0.0
            if failed:
                self._resume_at = time.monotonic() + delay
                aet, host, port = self.dest
                self.log(f"destination {aet}@{host}:{port}: {error}; {len(failed)} result set(s) waiting in "
                         f"the spool, next try in {delay:g} s")

    def _send(self, uids: list[str]) -> tuple[list[str], str]:
        """Send the results of ``uids``; (those not confirmed, the error)."""
        aet, host, port = self.dest
        tls = (self.tls_client, host) if self.tls_client else None
        try:
            assoc = self._scu.associate(host, port, ae_title=aet, tls_args=tls)
        except Exception as exc:  # TLS handshake, name resolution
            assoc, error = None, f"cannot connect ({type(exc).__name__}: {exc})"
        if assoc is None or not assoc.is_established:
            error = "association rejected, aborted or not reachable" if assoc is not None else error
            for uid in uids:
                self.spool.journal.failed_try(uid, error)
            return uids, error
        failed, error = [], ""
        try:
            for i, uid in enumerate(uids):
                if not assoc.is_established:
                    failed.extend(uids[i:])
                    error = error or "association ended"
                    break
                problem = self._store(assoc, uid)
                if problem:
                    failed.append(uid)
                    error = problem
                    self.spool.journal.failed_try(uid, problem)
        finally:
            if assoc.is_established:
                assoc.release()
        return failed, error

    def _store(self, assoc, uid: str) -> Optional[str]:
        """C-STORE one instance's results; None when every one was confirmed (then journaled as sent and removed
        from the spool), else what went wrong."""
        files = self.spool.results(uid)
        if not files:
            if self.spool.journal.status(uid) == "waiting":  # lost its results: classify it again
                self.spool.journal.received(uid, "", "", "", "")
                self.work.put(uid)
            return None
        for path in files:
            try:
                status = assoc.send_c_store(str(path))
            except ValueError as exc:  # no accepted presentation context for this SOP class / transfer syntax
                hint = "; start the node with --sc-uncompressed" if "JPEG" in str(exc) else ""
                return f"{path.name} not sent: {' '.join(str(exc).split())}{hint}"
            code = getattr(status, "Status", None)
            if code not in OK_STATUSES:
                return "no answer to C-STORE" if code is None else f"C-STORE answered 0x{code:04X}"
        self.spool.journal.sent(uid)
        self.spool.remove(uid)
        return None

    # -- life cycle ----------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Requeue what a previous run left: received instances to classify, results to send."""
        journal, known = self.spool.journal, set()
        for uid, status in journal.pending():
            known.add(self.spool.key(uid))
            (self.outbox if status == "waiting" and self.spool.results(uid) else self.work).put(uid)
            if status == "waiting" and not self.spool.results(uid):
                journal.received(uid, "", "", "", "")
        for path in sorted((self.spool.root / "in").glob("*.dcm")):  # written but not journaled: not answered
            if path.stem not in known:
                try:
                    ds = _header(path)
                    uid = str(ds.SOPInstanceUID)
                    journal.received(uid, "", str(ds.get("StudyInstanceUID", "")),
                                     str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPClassUID", "")))
                    self.work.put(uid)
                except Exception:
                    pass
        waiting = self.work.qsize() + self.outbox.qsize()
        if waiting:
            self.log(f"resuming {waiting} spooled instance(s) from {self.spool.root}")

    def start(self) -> "Node":
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import (ComprehensiveSRStorage, SecondaryCaptureImageStorage, Verification)
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = 16
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        self._scu = AE(ae_title=self.ae_title)
        for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            self._scu.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if self.sc_jpeg:  # its own context: the JPEG SC goes as it is, never decompressed by the sender
            self._scu.add_requested_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])
        self._scu.acse_timeout = self._scu.network_timeout = 10
        self._recover()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                    (evt.EVT_REJECTED, self._on_rejected)]
        try:
            self.server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                          ssl_context=self.tls_server)
        except OSError as exc:
            raise NodeError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self.port = self.server.server_address[1]
        self._threads = [threading.Thread(target=self._worker, args=(clf,), daemon=True, name=f"cxr-node-{i}")
                         for i, clf in enumerate(self.classifiers)]
        self._threads += [threading.Thread(target=self._sender, daemon=True, name=f"cxr-node-sender-{i}")
                          for i in range(self.senders)]
        for t in self._threads:
            t.start()
        aet, host, port = self.dest
        self.log(f"{self.ae_title} listening on {self.host}:{self.port}{' (TLS)' if self.tls_server else ''}, "
                 f"results to {aet}@{host}:{port}, spool {self.spool.root}")
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self.spool.journal.close()


def run_node(**options) -> None:
    """``cxr-edge dicom-node``: run until SIGINT/SIGTERM."""
    import signal

    node = Node(**options).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):  # a timeout keeps the main thread where signal handlers run
        pass
    node.log("stopping; unfinished work stays in the spool")
    node.stop()
