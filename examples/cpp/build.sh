#!/usr/bin/env bash
# Build choose_gamma against an ONNX Runtime SDK (the C/C++ headers and libonnxruntime.so).
#
#   ONNXRUNTIME_ROOT=SDK examples/cpp/build.sh [-o OUT]   an SDK you have: ONNX Runtime's release
#                                                          archive, an unpacked NuGet package, /usr
#   examples/cpp/build.sh --fetch [-o OUT]                 first assemble ONNX Runtime 1.21.0 in
#                                                          $SPECKV_CACHE/onnxruntime-1.21.0
#                                                          ($SPECKV_CACHE: ~/.cache/speckv)
#
# Without ONNXRUNTIME_ROOT the cache folder is used. OUT: examples/cpp/build/choose_gamma.
# --fetch (Linux x86_64, Debian's apt, pip) takes the headers from Debian's libonnxruntime-dev
# and libonnxruntime.so from PyPI's onnxruntime wheel, both 1.21.0, through the machine's own
# apt and pip configuration, into a temporary folder renamed into place when complete.
set -euo pipefail

ORT_VERSION=1.21.0
DEB_PACKAGE=libonnxruntime-dev=1.21.0+dfsg-1 DEB_SUITE=trixie
WHEEL=onnxruntime-1.21.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
WHEEL_SHA256=8a5d09815a9e209fa0cb20c2985b34ab4daeba7aea94d0f96b8751eb10403201
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="${SPECKV_CACHE:-$HOME/.cache/speckv}/onnxruntime-$ORT_VERSION"
OUT="$HERE/build/choose_gamma"
FETCH=0
while [ $# -gt 0 ]; do
  case $1 in
    --fetch) FETCH=1 ;;
    -o) OUT=$2; shift ;;
    *) echo "usage: $0 [--fetch] [-o OUT]" >&2; exit 2 ;;
  esac
  shift
done

fetch() {
  if [ "$(uname -sm)" != "Linux x86_64" ] || ! command -v apt-get >/dev/null ||
     ! command -v dpkg-deb >/dev/null; then
    echo "--fetch needs Linux x86_64 with apt-get and dpkg-deb; set ONNXRUNTIME_ROOT instead." >&2
    exit 1
  fi
  mkdir -p "$(dirname "$CACHE")"
  tmp=$(mktemp -d "$CACHE.tmp.XXXXXX") && chmod 755 "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  # the headers: Debian's package, from the mirror this machine's apt uses, in a private apt state
  local apt="$tmp/apt" mirror
  mirror=$(apt-get indextargets --no-release-info --format '$(REPO_URI)' |
    grep -v -- -security | head -n 1)
  [ -n "$mirror" ] || { echo "no Debian mirror in this machine's apt sources" >&2; exit 1; }
  mkdir -p "$apt/sources" "$apt/lists/partial" "$apt/cache/archives/partial" "$tmp/include" \
    "$tmp/lib"
  printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n' "$mirror" \
    "$DEB_SUITE" /usr/share/keyrings/debian-archive-keyring.gpg >"$apt/sources/debian.sources"
  local opts=(-qq -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$apt/sources"
    -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Dir::State::Status=/dev/null
    -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update
  (cd "$apt" && apt-get "${opts[@]}" download "$DEB_PACKAGE")
  dpkg-deb -x "$apt"/libonnxruntime-dev_*.deb "$apt/deb"
  cp "$apt"/deb/usr/include/onnxruntime/*.h "$tmp/include/"
  # the library: PyPI's wheel (any Python's: the library in it is the same), checked by hash
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_27_x86_64 -d "$tmp/wheel" "onnxruntime==$ORT_VERSION"
  echo "$WHEEL_SHA256  $tmp/wheel/$WHEEL" | sha256sum -c --quiet
  local so=libonnxruntime.so.$ORT_VERSION
  "${PYTHON:-python3}" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(
    sys.argv[1]).read(sys.argv[2]))' "$tmp/wheel/$WHEEL" "onnxruntime/capi/$so" >"$tmp/lib/$so"
  chmod 755 "$tmp/lib/$so"
  ln -s "$so" "$tmp/lib/libonnxruntime.so.1"
  ln -s libonnxruntime.so.1 "$tmp/lib/libonnxruntime.so"
  printf 'ONNX Runtime %s: include/ from Debian %s (%s), lib/ from PyPI %s\n' \
    "$ORT_VERSION" "$DEB_PACKAGE" "$DEB_SUITE" "$WHEEL" >"$tmp/SOURCES"
  rm -rf "$apt" "$tmp/wheel"
  mv -T "$tmp" "$CACHE" 2>/dev/null || echo "$CACHE appeared meanwhile; keeping it" >&2
  rm -rf "$tmp"
  trap - EXIT
}

if [ -z "${ONNXRUNTIME_ROOT:-}" ]; then
  if [ "$FETCH" = 1 ] && [ ! -d "$CACHE" ]; then fetch; fi
  ONNXRUNTIME_ROOT=$CACHE
fi
# the layouts: include/ + lib/ (release archive, the cache), NuGet's, Debian's
first() { local f=$1; shift; for d in "$@"; do [ -e "$d/$f" ] && echo "$d" && return; done; }
R=$ONNXRUNTIME_ROOT
INC=$(first onnxruntime_cxx_api.h "$R"/{include,include/onnxruntime,build/native/include})
LIB=$(first libonnxruntime.so "$R"/{lib,lib/x86_64-linux-gnu,runtimes/linux-x64/native})
if [ -z "$INC" ] || [ -z "$LIB" ]; then
  echo "No ONNX Runtime SDK (onnxruntime_cxx_api.h and libonnxruntime.so) in $ONNXRUNTIME_ROOT:" \
    "set ONNXRUNTIME_ROOT, or run $0 --fetch." >&2
  exit 1
fi
mkdir -p "$(dirname "$OUT")"
"${CXX:-g++}" -std=c++17 -O2 -Wall -Wextra -I"$INC" "$HERE/choose_gamma.cpp" -o "$OUT" \
  -L"$LIB" -lonnxruntime -Wl,-rpath,"$LIB"
echo "$OUT (ONNX Runtime from $LIB)"
