"""``python -m benchmarks.pacs``: ``cxr-edge dicom-node`` against a real Orthanc on this machine (issue #32).

Orthanc (Debian's, ``benchmarks/orthanc.py``: generated configuration, free loopback ports, temporary storage)
and the node (``python -m cxr_edge dicom-node --workers W``, a subprocess, as deployed) run here; scans (the
official test split's first N, else ``tests/data``) are wrapped as CR objects and uploaded to Orthanc first.

- Latency: Orthanc is asked to send one instance (``/modalities/<name>/store``, one association); the time
  runs from that request to the moment the node's journal records that Orthanc confirmed the instance's last
  result object (``sent``: the SR, then the SC; so this is "until the SR *and* the SC are stored", at least
  the time to the SR). p50 / p95 over the instances with 1 association at a time (sequential), and with 4
  concurrent associations (4 threads, each asking Orthanc to send its instances one by one).
- Throughput: instances / wall time of the 4-association run (first request to last ``sent``), against
  ``Classifier().classify_many`` on the same DICOM files with the command line's defaults (what
  ``cxr-edge classify`` runs, without its start-up), and the wall time of ``cxr-edge classify --json`` itself.
  The same once more with each of the 4 lanes sending its whole share in one request (one association, several
  instances: a PACS forwarding a series), and Orthanc's own sending rate both ways to an SCP that only
  acknowledges: the ceiling this PACS sets on this machine.

Targets: p95 <= 1 s with one association; throughput with 4 associations >= 60% of ``cxr-edge classify``.
Writes ``pacs.json`` and ``pacs.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from benchmarks.common import add_out, write_results
from benchmarks.machine import describe
from benchmarks.orthanc import Orthanc, free_port, is_up, orthanc_exe, wrap_scan

PROJECT = Path(__file__).resolve().parent.parent
OFFICIAL = PROJECT.parent / "shared" / "data" / "chest_xray" / "test"


def _scans(n: int) -> list[Path]:
    found = sorted(OFFICIAL.rglob("*.jpeg")) if OFFICIAL.is_dir() else []
    if not found:
        found = sorted((PROJECT / "tests" / "data" / "chest_xray" / "test").rglob("*.jpeg"))
    step = max(1, len(found) // n)
    return [found[(i * step) % len(found)] for i in range(n)]


def _sent_times(journal: Path, uids: list[str], timeout: float = 300) -> dict:
    """SOP Instance UID -> POSIX time the node recorded as sent, waiting until all are sent."""
    deadline, out = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT sop_instance_uid, sent, status FROM journal WHERE status IN "
                              "('sent','unreadable')").fetchall()
        finally:
            db.close()
        out = {u: datetime.fromisoformat(s).timestamp() if s else None for u, s, _ in rows if u in uids}
        if len(out) == len(uids):
            return out
        time.sleep(0.01)
    raise TimeoutError(f"{len(out)} of {len(uids)} instances sent within {timeout} s")


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


def _lanes(send, ids: list, lanes: int, batched: bool) -> float:
    """Start time of ``lanes`` threads, each asking Orthanc to send its share of ``ids`` (``ids[k::lanes]``)
    with ``send(list_of_ids)``: one instance per request (``batched=False``), or its whole share in one
    request, so one association carries several instances (``batched=True``); returns when all are done."""
    def lane(k):
        share = ids[k::lanes]
        for chunk in ([share] if batched else [[i] for i in share]):
            send(chunk)

    t0 = time.time()
    threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return t0


def _sink_rate(pacs, ids: list, lanes: int = 4, batched: bool = False) -> float:
    """Instances/s of Orthanc's own sending, the same way (``lanes`` threads, one instance per request or
    ``batched``: each lane's share in one request), to a storage SCP that only acknowledges (pynetdicom,
    nothing written, nothing sent back): the most any node can reach with this PACS on this machine."""
    from pynetdicom import AE, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES, evt

    got, lock = [], threading.Lock()

    def on_store(event):
        with lock:
            got.append(time.time())
        return 0x0000

    ae = AE(ae_title="SINK")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        pacs.add_modality("sink", "SINK", "127.0.0.1", port)
        pacs.send("sink", [ids[0]])  # warm-up, not counted
        got.clear()
        t0 = _lanes(lambda chunk: pacs.send("sink", chunk), ids, lanes, batched)
        return len(got) / (max(got) - t0) if got else float("nan")
    finally:
        server.shutdown()


def _node_stages(files: list) -> dict:
    """Milliseconds per instance of each step of the node's work on ``files``, in this process, one thread, as
    ``Node._process`` does it: read the header, classify (gate and heatmap), build the SR, build the SC, encode
    both (the spool's writes, the journal and the network are not in it)."""
    import io

    from cxr_edge import dicomresults
    from cxr_edge.dicomnode import Node, _header
    from cxr_edge.preprocess import _open

    clf = Node._classifier(None, None, True)
    list(clf.classify_many([str(files[0])]))  # warm-up
    spent = dict.fromkeys(("header", "classify", "sr", "sc", "encode"), 0.0)

    def timed(step, fn):
        t = time.perf_counter()
        value = fn()
        spent[step] += time.perf_counter() - t
        return value

    for path in files:
        header = timed("header", lambda: _header(path))
        result = timed("classify", lambda: next(iter(clf.classify_many([str(path)]))))
        record = {k: v for k, v in result.to_dict().items() if k != "path"}
        uids = dicomresults.result_uids(header, clf.model.sha256)
        objects = [timed("sr", lambda: dicomresults.structured_report(header, record, uids))]
        if record.get("label") is not None:
            def sc():
                with _open(str(path)) as image:
                    return dicomresults.secondary_capture(header, record, uids, image, getattr(result, "heatmap", None))
            objects.append(timed("sc", sc))
        timed("encode", lambda: [ds.save_as(io.BytesIO(), enforce_file_format=True) for ds in objects])
    return {k: 1000 * v / len(files) for k, v in spent.items()}


def run(n: int, workers: int, out: Path) -> dict:
    from cxr_edge.classifier import Classifier

    scans = _scans(n)
    with tempfile.TemporaryDirectory(prefix="cxr-pacs-bench-") as tmp:
        tmp = Path(tmp)
        node_port = free_port()
        pacs = Orthanc(tmp / "orthanc", {"cxredge": ("CXREDGE", "127.0.0.1", node_port)}).start()
        node = None
        try:
            sets = {}
            for phase in ("one", "four", "batched"):
                study = f"1.2.826.0.1.3680043.10.1137.{int(time.time() * 1000)}.{len(sets) + 1}"
                files = []
                for i, scan in enumerate(scans):
                    path = tmp / f"{phase}-{i}.dcm"
                    path.write_bytes(wrap_scan(scan, study, study + ".1", SOPInstanceUID=f"{study}.1.{i + 1}",
                                               InstanceNumber=i + 1))
                    files.append(path)
                ids = [pacs.upload(p.read_bytes()) for p in files]
                sets[phase] = (files, ids, [f"{study}.1.{i + 1}" for i in range(len(files))])
            spool = tmp / "spool"
            log = open(tmp / "node.log", "wb")
            node = subprocess.Popen([sys.executable, "-m", "cxr_edge", "dicom-node", "--port", str(node_port),
                                     "--spool", str(spool), "--workers", str(workers),
                                     "--send-to", f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}"],
                                    cwd=PROJECT, stdout=log, stderr=log)
            while not is_up(node_port):
                assert node.poll() is None, (tmp / "node.log").read_text()
                time.sleep(0.05)
            # warm-up: one instance (the model's first passes), not counted
            pacs.send("cxredge", [sets["one"][1][0]])
            _sent_times(spool / "journal.sqlite", [sets["one"][2][0]])

            files, ids, uids = sets["one"]
            starts = {}
            for i, uid in zip(ids[1:], uids[1:]):
                starts[uid] = time.time()
                pacs.send("cxredge", [i])
                _sent_times(spool / "journal.sqlite", [uid])
            sent = _sent_times(spool / "journal.sqlite", list(starts))
            lat1 = [sent[u] - starts[u] for u in starts]

            files4, ids4, uids4 = sets["four"]
            starts4 = {}

            uid_of = dict(zip(ids4, uids4))

            def send4(chunk):
                starts4[uid_of[chunk[0]]] = time.time()
                pacs.send("cxredge", chunk)

            t0 = _lanes(send4, ids4, 4, batched=False)
            sent4 = _sent_times(spool / "journal.sqlite", uids4)
            lat4 = [sent4[u] - starts4[u] for u in uids4]
            node_rate = len(uids4) / (max(sent4.values()) - t0)
            # the same 4 lanes, each lane's share in one request (one association, several instances)
            _, idsb, uidsb = sets["batched"]
            t0 = _lanes(lambda chunk: pacs.send("cxredge", chunk), idsb, 4, batched=True)
            sentb = _sent_times(spool / "journal.sqlite", uidsb)
            node_rate_batched = len(uidsb) / (max(sentb.values()) - t0)
            sink_rate = _sink_rate(pacs, ids4)
            sink_rate_batched = _sink_rate(pacs, ids4, batched=True)
        finally:
            if node is not None:
                node.terminate()
                node.wait(30)
            pacs.stop()

        clf = Classifier()
        list(clf.classify_many([str(files4[0])]))  # warm-up
        t = time.perf_counter()
        records = list(clf.classify_many([str(p) for p in files4]))
        classify_rate = len(files4) / (time.perf_counter() - t)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cxr_edge", "classify", "--json", *map(str, files4)], cwd=PROJECT,
                       capture_output=True, check=False)
        cli_wall = time.perf_counter() - t
        stages = _node_stages(files4)
    labelled = sum(1 for r in records if r.ok)
    result = {
        "command": f"python -m benchmarks.pacs --n {n} --workers {workers}", "machine": describe(),
        "orthanc": subprocess.run([orthanc_exe(), "--version"], capture_output=True, text=True).stdout.split("\n")[0],
        "instances_per_run": len(files4), "labelled": labelled, "node_workers": workers,
        "one_association": {"p50_s": _pct(lat1, 50), "p95_s": _pct(lat1, 95), "max_s": max(lat1), "n": len(lat1)},
        "four_associations": {"p50_s": _pct(lat4, 50), "p95_s": _pct(lat4, 95), "max_s": max(lat4),
                              "n": len(lat4), "instances_per_s": node_rate},
        "classify_instances_per_s": classify_rate, "classify_cli_wall_s": cli_wall,
        "classify_cli_instances_per_s": len(files4) / cli_wall,
        "throughput_ratio": node_rate / classify_rate,
        "orthanc_send_only_instances_per_s": sink_rate, "node_vs_orthanc_send_only": node_rate / sink_rate,
        "batched": {"instances_per_s": node_rate_batched, "throughput_ratio": node_rate_batched / classify_rate,
                    "orthanc_send_only_instances_per_s": sink_rate_batched,
                    "node_vs_orthanc_send_only": node_rate_batched / sink_rate_batched},
        "node_stage_ms": stages,
    }
    result["targets"] = {"p95_one_association_le_1s": result["one_association"]["p95_s"] <= 1.0,
                         "throughput_ge_60pct_of_classify": result["throughput_ratio"] >= 0.6}
    return result


def markdown(r: dict) -> str:
    m, one, four, b = r["machine"], r["one_association"], r["four_associations"], r["batched"]
    ok = {True: "met", False: "NOT met"}
    return "\n".join([
        "# DICOM node against Orthanc (`python -m benchmarks.pacs`)", "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores (shared with other work), Python {m['python']}; "
        f"{r['orthanc']}; node `--workers {r['node_workers']}`; {r['instances_per_run']} instances per run "
        f"({r['labelled']} labelled, so one SR + one SC each). Command: `{r['command']}`.", "",
        "Latency: from asking Orthanc to send an instance to the node's journal recording that Orthanc confirmed "
        "its last result object (SR, then SC).", "",
        "| associations | p50 (s) | p95 (s) | max (s) | instances/s |", "|---|---|---|---|---|",
        f"| 1 (sequential) | {one['p50_s']:.3f} | {one['p95_s']:.3f} | {one['max_s']:.3f} | |",
        f"| 4 (concurrent) | {four['p50_s']:.3f} | {four['p95_s']:.3f} | {four['max_s']:.3f} | "
        f"{four['instances_per_s']:.2f} |", "",
        f"`cxr-edge classify` on the same files: {r['classify_instances_per_s']:.2f} instances/s "
        f"(Classifier().classify_many with the command line's defaults, after a warm-up); the command itself took "
        f"{r['classify_cli_wall_s']:.2f} s wall ({r['classify_cli_instances_per_s']:.2f}/s with its start-up). "
        f"Node with 4 associations: {r['throughput_ratio']:.0%} of it.", "",
        f"Orthanc's own sending, the same 4 lanes, to a storage SCP that only acknowledges (nothing written, "
        f"nothing sent back): {r['orthanc_send_only_instances_per_s']:.2f} instances/s, the most any node can "
        f"reach with this PACS here; the node reaches {r['node_vs_orthanc_send_only']:.0%} of it.", "",
        f"The same 4 lanes with each lane's share sent in one request (one association carrying "
        f"{r['instances_per_run'] // 4} instances, as a PACS forwarding a whole series does): the node "
        f"{b['instances_per_s']:.2f} instances/s ({b['throughput_ratio']:.0%} of classify); Orthanc's own sending "
        f"to the acknowledging SCP {b['orthanc_send_only_instances_per_s']:.2f} instances/s (the node reaches "
        f"{b['node_vs_orthanc_send_only']:.0%} of it). The target below reads the one-instance-per-request run.", "",
        "The node's own work per instance (one thread, in-process, ms; spool writes, journal and network not "
        "included): " + ", ".join(f"{k} {v:.1f}" for k, v in r["node_stage_ms"].items()) + ".", "",
        f"- p95 <= 1 s with one association: {ok[r['targets']['p95_one_association_le_1s']]} "
        f"({one['p95_s']:.3f} s)",
        f"- throughput with 4 associations >= 60% of classify: "
        f"{ok[r['targets']['throughput_ge_60pct_of_classify']]} ({r['throughput_ratio']:.0%})", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pacs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="instances per run")
    ap.add_argument("--workers", type=int, default=2, help="the node's --workers")
    add_out(ap)
    args = ap.parse_args(argv)
    if orthanc_exe() is None:
        print("benchmarks.pacs: Orthanc is not installed (apt-get install orthanc)", file=sys.stderr)
        return 2
    result = run(args.n, args.workers, args.out)
    write_results(args.out, "pacs", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
