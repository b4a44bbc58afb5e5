#!/usr/bin/env bash
# cxr-edge on aarch64 under QEMU user emulation, against this x86 machine (docs/runtimes.md, "ARM").
#
# 1. an arm64 Python: Debian's python3.11 and its libraries for arm64, downloaded with apt-get (its arm64 lists
#    kept in the cache, not the system's) and unpacked into a sysroot that qemu-aarch64-static runs from (-L);
# 2. the aarch64 wheels `pip install .` picks: this commit's cxr-edge wheel (pure Python, built here) installed
#    by pip running *inside* the emulated Python, so platform markers read aarch64 (LiteRT, not ONNX Runtime),
#    plus the [onnx] extra to run the ONNX model too;
# 3. `cxr-edge classify --json` on the sample and a few official test scans, per backend, emulated and native
#    (the same source), compared: same labels, probabilities within 0.02. Writes benchmarks/results/arm64.{json,md}.
#
# Needs qemu-user-static (apt-get install qemu-user-static) and, the first time, the network (Debian's arm64
# packages, the wheels from the package index); later runs reuse the cache ($CXR_ARM_CACHE). No binfmt_misc
# needed: every arm64 program is started through qemu-aarch64-static explicitly.
# Usage: scripts/arm64-check.sh [N_TEST_SCANS]   (default 6)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CXR_ARM_CACHE:-$HOME/.cache/cxr-edge-arm64}
HOSTPY=${HOSTPY:-$ROOT/.venv/bin/python}
N=${1:-6}
QEMU=$(command -v qemu-aarch64-static || true)
[ -n "$QEMU" ] || { echo "arm64-check: qemu-aarch64-static not found (apt-get install qemu-user-static)" >&2; exit 2; }
mkdir -p "$CACHE"
SYSROOT=$CACHE/sysroot
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
    echo "arm64-check: fetching Debian's arm64 python3.11 into $SYSROOT"
    APT=(-o APT::Architecture=arm64 -o APT::Architectures=arm64 -o "Dir::State::Lists=$CACHE/lists"
         -o "Dir::Cache=$CACHE/apt" -o Debug::NoLocking=1)
    mkdir -p "$CACHE/lists/partial" "$CACHE/apt/archives/partial" "$CACHE/debs"
    apt-get "${APT[@]}" update -qq
    (cd "$CACHE/debs" && apt-get "${APT[@]}" download -q python3.11 python3.11-minimal libpython3.11-minimal \
        libpython3.11-stdlib libc6 gcc-12-base libgcc-s1 libstdc++6 libgomp1 zlib1g libexpat1 libffi8 libssl3 \
        libbz2-1.0 liblzma5 libzstd1 libsqlite3-0 libuuid1 libcrypt1 libdb5.3 libgdbm6 libncursesw6 libtinfo6 \
        libreadline8 readline-common libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 \
        libkeyutils1 libcom-err2 libmd0 media-types)
    for deb in "$CACHE"/debs/*.deb; do dpkg -x "$deb" "$SYSROOT"; done
fi
# qemu-user passes /proc/cpuinfo and /sys through from this x86 host (7.2 fakes them for other targets only);
# onnxruntime's cpuinfo then finds no ARM processor and its module crashes on import (SIGSEGV). Files under
# the -L prefix win over the host's: one Neoverse-N1-like core, as a real aarch64 kernel describes it.
mkdir -p "$SYSROOT/proc" "$SYSROOT/sys/devices/system/cpu"
printf 'processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' > "$SYSROOT/proc/cpuinfo"
for f in possible present online; do echo 0 > "$SYSROOT/sys/devices/system/cpu/$f"; done
ARMPY=("$QEMU" -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11")
"${ARMPY[@]}" -c 'import platform, sys; print("arm64-check: emulated", platform.machine(), "Python", sys.version.split()[0])'

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" archive HEAD | tar -x -C "$WORK" --one-top-level=src
SHA=$(git -C "$ROOT" rev-parse --short HEAD)
"$HOSTPY" -m pip wheel -q --no-deps -w "$WORK/wheels" "$WORK/src" 2>/dev/null
WHEEL=$(ls "$WORK"/wheels/cxr_edge-*.whl)
ENV=$CACHE/env-$SHA
if [ ! -d "$ENV" ]; then
    [ -f "$CACHE/pip.whl" ] || { "$HOSTPY" -m pip download -q --no-deps -d "$CACHE/pipdl" pip 2>/dev/null && cp "$CACHE"/pipdl/pip-*.whl "$CACHE/pip.whl"; }
    echo "arm64-check: pip install '$(basename "$WHEEL")[onnx]' inside the emulated Python (a few minutes)"
    "${ARMPY[@]}" "$CACHE/pip.whl/pip" install -q --no-cache-dir --target "$ENV.tmp" "$WHEEL[onnx]" 2>&1 | grep -v "^WARNING: Location" || true
    mv "$ENV.tmp" "$ENV"
fi
ls "$ENV" | grep -E '\.dist-info$' | sed 's/^/arm64-check: installed /'

DATA=$ROOT/../shared/data/chest_xray/test
FILES=("$ROOT/cxr_edge/samples/person100_bacteria_477.jpeg")
if [ -d "$DATA" ]; then
    while IFS= read -r f; do FILES+=("$f"); done < <(find "$DATA" -name '*.jpeg' | sort | awk -v n="$N" 'NR % 53 == 1 && c++ < n')
else
    while IFS= read -r f; do FILES+=("$f"); done < <(find "$ROOT/tests/data/chest_xray/test" -name '*.jpeg' | sort)
fi
for backend in tflite onnx; do
    t0=$(date +%s.%N)
    (cd "$WORK/src" && PYTHONPATH="$ENV" "${ARMPY[@]}" -m cxr_edge classify --json --backend "$backend" "${FILES[@]}" \
        > "$WORK/arm-$backend.jsonl" 2> "$WORK/arm-$backend.err") || true
    echo "$t0 $(date +%s.%N)" > "$WORK/arm-$backend.time"
    (cd "$WORK/src" && PYTHONPATH="$WORK/src" "$HOSTPY" -m cxr_edge classify --json --backend "$backend" "${FILES[@]}" \
        > "$WORK/x86-$backend.jsonl" 2>/dev/null) || true
done

"$HOSTPY" - "$WORK" "$ROOT/benchmarks/results" "$SHA" "${#FILES[@]}" <<'PY'
import json, pathlib, platform, sys
work, out, sha, n = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
rows, ok = {}, True
for b in ("tflite", "onnx"):
    arm = [json.loads(l) for l in (work / f"arm-{b}.jsonl").read_text().splitlines() if l.strip()]
    x86 = [json.loads(l) for l in (work / f"x86-{b}.jsonl").read_text().splitlines() if l.strip()]
    t0, t1 = map(float, (work / f"arm-{b}.time").read_text().split())
    if len(arm) != n or len(x86) != n:
        rows[b] = {"error": (work / f"arm-{b}.err").read_text()[-800:]}
        ok = False
        continue
    same = sum(a.get("label") == x.get("label") and a.get("status") == x.get("status") for a, x in zip(arm, x86))
    dp = max((abs(a["probabilities"][k] - v) for a, x in zip(arm, x86) if "probabilities" in a and "probabilities" in x
              for k, v in x["probabilities"].items()), default=float("nan"))
    rows[b] = {"scans": n, "same_labels": same, "max_abs_dp": dp, "emulated_wall_s": round(t1 - t0, 1),
               "labels": [a.get("label") or a.get("status") for a in arm]}
    ok &= same == n and dp <= 0.02
res = {"commit": sha, "host": platform.processor() or platform.machine(), "emulation": "qemu-aarch64-static (user mode)",
       "python": "Debian arm64 python3.11", "backends": rows, "met": ok}
out.mkdir(parents=True, exist_ok=True)
(out / "arm64.json").write_text(json.dumps(res, indent=2) + "\n")
md = ["# cxr-edge on aarch64 (QEMU user emulation) against x86", "",
      f"`scripts/arm64-check.sh`, commit {sha}: `cxr-edge classify --json` on the sample and official test scans, "
      "emulated aarch64 (Debian arm64 Python 3.11, the wheels pip picks there) against this x86 machine, same source.", "",
      "| backend | scans | same labels | max abs dp | emulated wall s |", "|---|---:|---:|---:|---:|"]
for b, r in rows.items():
    md.append(f"| {b} | {r.get('scans', '-')} | {r.get('same_labels', '-')} | {r.get('max_abs_dp', float('nan')):.6f} | "
              f"{r.get('emulated_wall_s', '-')} |" if "error" not in r else f"| {b} | failed: {r['error'][-200:]} | | | |")
md += ["", f"Target (same labels, probabilities within 0.02): {'met' if ok else 'NOT met'}.", ""]
(out / "arm64.md").write_text("\n".join(md))
print("\n".join(md))
sys.exit(0 if ok else 1)
PY
