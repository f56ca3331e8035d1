#!/usr/bin/env bash
# Lay out an ONNX Runtime SDK for the C++ sampler: headers from Debian's libonnxruntime-dev
# (trixie suite; bookworm has none) and the shared library shipped in the Python onnxruntime
# wheel. Usage: get_onnxruntime.sh [DEST]   (default: <repo>/build/onnxruntime)
# Prints the ONNXRUNTIME_ROOT to pass to CMake on its last line.
#
# The trixie sources list is derived at run time from this machine's own Debian sources entry,
# so no mirror is written down here. Needs: python with onnxruntime installed, apt-get, dpkg.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${1:-$repo/build/onnxruntime}"
python="${PYTHON:-python}"

if [ -f "$dest/include/onnxruntime_cxx_api.h" ] && [ -e "$dest/lib/libonnxruntime.so.1" ]; then
  echo "ONNXRUNTIME_ROOT=$dest"
  exit 0
fi

capi="$("$python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')" || {
  echo "get_onnxruntime.sh: the onnxruntime Python package is missing; pip install onnxruntime" >&2
  exit 1
}
lib="$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -n 1)"
[ -n "$lib" ] || { echo "get_onnxruntime.sh: no libonnxruntime.so.1.* in $capi" >&2; exit 1; }

# The first Debian archive URI (not the security one) of this machine's apt sources.
mirror="$(
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
      sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p'
  } | grep -v -- '-security' | grep '/debian/\?$' | head -n 1 || true
)"
[ -n "$mirror" ] || { echo "get_onnxruntime.sh: found no Debian archive in /etc/apt sources" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring] $mirror trixie main" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Get::List-Cleanup=0")
# as root, apt drops to the _apt user, which cannot write into our private mktemp folder
[ "$(id -u)" -ne 0 ] || apt_opts+=(-o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" -qq update
(cd "$work" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/root"

header="$(find "$work/root" -name onnxruntime_cxx_api.h | head -n 1)"
[ -n "$header" ] || { echo "get_onnxruntime.sh: libonnxruntime-dev holds no onnxruntime_cxx_api.h" >&2; exit 1; }
mkdir -p "$dest/include" "$dest/lib"
cp "$(dirname "$header")"/*.h "$dest/include/"
# link the wheel's library; the loader looks for the soname libonnxruntime.so.1
ln -sf "$lib" "$dest/lib/$(basename "$lib")"
ln -sf "$(basename "$lib")" "$dest/lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$dest/lib/libonnxruntime.so"
echo "ONNXRUNTIME_ROOT=$dest"
