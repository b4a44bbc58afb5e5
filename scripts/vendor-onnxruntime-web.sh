#!/bin/sh
# Vendor onnxruntime-web's WASM build (its npm package, never a CDN) into cxr_edge/webapp/vendor/, which the
# wheel ships and `cxr-edge export-web` copies. Run when bumping the version: scripts/vendor-onnxruntime-web.sh [VERSION]
set -eu
VERSION=${1:-1.31.1}
dest=$(cd "$(dirname "$0")/.." && pwd)/cxr_edge/webapp/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "onnxruntime-web@$VERSION" >/dev/null && tar xzf "onnxruntime-web-$VERSION.tgz")
mkdir -p "$dest"
for f in ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm; do
    cp "$tmp/package/dist/$f" "$dest/$f"
done
# the npm package declares "license": "MIT" and ships no LICENSE file: onnxruntime's own MIT text
grep -q '"license": "MIT"' "$tmp/package/package.json"
cat > "$dest/LICENSE" <<'MIT'
MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
MIT
{
    echo "onnxruntime-web $VERSION from npm (npm pack onnxruntime-web@$VERSION), package/dist; MIT (LICENSE)"
    (cd "$dest" && sha256sum ort.wasm.min.mjs ort-wasm-simd-threaded.mjs ort-wasm-simd-threaded.wasm)
} > "$dest/VERSION"
cat "$dest/VERSION"
