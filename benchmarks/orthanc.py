"""A throwaway Orthanc PACS (Debian's ``orthanc`` package) for ``tests/test_dicom_node.py`` and
``benchmarks/pacs.py``: a generated configuration on free loopback ports, storage in a given folder, the REST
calls those need, and scans wrapped as CR DICOM objects."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def orthanc_exe() -> Optional[str]:
    return shutil.which("Orthanc") or shutil.which("orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrap_scan(path, study_uid: str, series_uid: str, patient_id: str = "CXR-TEST-1", **tags) -> bytes:
    """A scan (JPEG, PNG) as an 8-bit CR object of the given study and series, frontal chest unless ``tags``
    say otherwise."""
    from cxr_edge.dicom import gray_to_dicom

    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"))
    base = dict(Modality="CR", SOPClassUID=CR_IMAGE_STORAGE, StudyInstanceUID=study_uid,
                SeriesInstanceUID=series_uid, PatientID=patient_id, PatientName="Test^Chest", PatientBirthDate="",
                PatientSex="O", StudyDate="20261205", StudyTime="090000", StudyID="1", AccessionNumber="",
                ReferringPhysicianName="", SeriesNumber=1, InstanceNumber=1, BodyPartExamined="CHEST",
                ViewPosition="PA")
    base.update(tags)
    return gray_to_dicom(pixels, **base)


class Orthanc:
    """``Orthanc(folder).start()`` ... ``.stop()``; ``modalities``: name -> (AE title, host, port)."""

    def __init__(self, folder: Path, modalities: Optional[dict] = None, aet: str = "ORTHANC"):
        self.folder = Path(folder)
        self.aet, self.http_port, self.dicom_port = aet, free_port(), free_port()
        self.modalities = dict(modalities or {})
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 30) -> "Orthanc":
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "cxr-edge-test", "StorageDirectory": str(self.folder / "db"),
                  "IndexDirectory": str(self.folder / "db"), "HttpPort": self.http_port,
                  "DicomPort": self.dicom_port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "Plugins": [], "ConcurrentJobs": 4, "HttpThreadsCount": 16,
                  "DicomThreadsCount": 8, "DicomScuTimeout": 10, "StableAge": 1,
                  "DicomModalities": {k: list(v) for k, v in self.modalities.items()}}
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=1))
        log = open(self.folder / "orthanc.log", "wb")
        self.proc = subprocess.Popen([orthanc_exe(), str(self.folder / "orthanc.json")], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.rest("GET", "/system")
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rest(self, method: str, path: str, body=None, timeout: float = 60):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw

    def upload(self, data: bytes) -> str:
        """Store a DICOM file; its Orthanc instance ID."""
        return self.rest("POST", "/instances", data)["ID"]

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.rest("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def send(self, modality: str, ids: list) -> dict:
        """Orthanc sends these instances to the modality with C-STORE (one association; returns when done)."""
        return self.rest("POST", f"/modalities/{modality}/store", {"Resources": list(ids), "Synchronous": True})

    def study_id(self, study_uid: str) -> Optional[str]:
        found = [r["ID"] for r in self.rest("POST", "/tools/lookup", study_uid.encode()) if r["Type"] == "Study"]
        return found[0] if found else None

    def instances(self, study_uid: str) -> list[dict]:
        """The study's instances as Orthanc lists them (``ID``, ``MainDicomTags``, ...), [] when none."""
        study = self.study_id(study_uid)
        return [] if study is None else self.rest("GET", f"/studies/{study}/instances")

    def modality_counts(self, study_uid: str) -> dict:
        """{Modality: number of instances} in the study (the node's results: SR and OT)."""
        counts: dict = {}
        for series in self.series(study_uid):
            m = series["MainDicomTags"].get("Modality", "")
            counts[m] = counts.get(m, 0) + len(series["Instances"])
        return counts

    def series(self, study_uid: str) -> list[dict]:
        study = self.study_id(study_uid)
        return [] if study is None else self.rest("GET", f"/studies/{study}/series")

    def file(self, instance_id: str) -> bytes:
        return self.rest("GET", f"/instances/{instance_id}/file")


def is_up(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False

