#!/usr/bin/env bash
# Build .whl/gpusite.tar.xz: GalSim and astropy (and their needs) for the GPU machine's Python 3.12,
# which has torch but neither of them and no network. GalSim's extension carries ~195 MB of debug
# symbols; stripping them brings the archive to ~12 MB, under the device tool's 64 MiB carry limit.
# Run here (on this machine, with network), once per session:  bash benchmarks/make_gpu_site.sh
# Then carry ".whl" in the device call; benchmarks/gpu_default_model.sh unpacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp/wheels" \
    galsim==2.8.5 astropy==8.0.2 pyerfa astropy-iers-data LSSTDESC.Coord
mkdir -p "$tmp/site" .whl
for w in "$tmp"/wheels/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
strip --strip-unneeded "$tmp"/site/galsim/_galsim*.so
rm -rf "$tmp/site/galsim/share/roman"
tar cJf .whl/gpusite.tar.xz -C "$tmp/site" .
rm -rf "$tmp"
ls -la .whl/gpusite.tar.xz
