#!/usr/bin/env bash
# Builds LLVM's OpenMP runtime (libomp) for the macOS wheels: cibuildwheel's before-all on macOS
# ([tool.cibuildwheel.macos] in pyproject.toml).
#
# Why from source: the libomp that delocate copies into a wheel must not need a newer macOS
# than the wheel's tag says.  Homebrew's bottle targets the runner's own macOS, so a wheel
# tagged 10.15/11.0 would carry a library that needs 14 or 15 (delocate refuses, or the wheel
# breaks on older systems).  Building the release sources with the wheel's own
# MACOSX_DEPLOYMENT_TARGET makes the two match by construction, with no binary we cannot audit.
#
# For each arch (CIBW_ARCHS_MACOS when it names arches, else this machine's) it installs
#   /tmp/gpt2s-libomp/<arch>/{include/omp.h, lib/libomp.dylib}
# with an absolute install name (so delocate finds the file) and the deployment target below,
# which must stay equal to MACOSX_DEPLOYMENT_TARGET in the pyproject.toml overrides.
set -euo pipefail

LLVM_VERSION=19.1.7
OPENMP_SHA256=bd7e6901ab086fd268750363017935fd4a717c153dad3c2aab86cb0140d9e3fe
CMAKE_SHA256=11c5a28f90053b0c43d0dec3d0ad579347fc277199c005206b963c19aae514e3
PREFIX_ROOT=${GPT2S_LIBOMP_ROOT:-/tmp/gpt2s-libomp}
URL=https://github.com/llvm/llvm-project/releases/download/llvmorg-${LLVM_VERSION}

target_for() {  # keep in step with [[tool.cibuildwheel.overrides]] in pyproject.toml
  case "$1" in
    x86_64) echo 10.15 ;;
    arm64) echo 11.0 ;;
    *) echo "build_libomp_macos.sh: unsupported arch $1" >&2; return 1 ;;
  esac
}

archs=()
for a in ${CIBW_ARCHS_MACOS:-${CIBW_ARCHS:-}}; do
  case "$a" in
    x86_64|arm64) archs+=("$a") ;;
    universal2) archs+=(x86_64 arm64) ;;
  esac
done
[ ${#archs[@]} -gt 0 ] || archs=("$(uname -m)")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch() {  # fetch NAME URL SHA256 -> $work/NAME (top directory stripped)
  curl --fail --location --silent --show-error --retry 3 "$2" -o "$work/$1.tar.xz"
  echo "$3  $work/$1.tar.xz" | shasum -a 256 --check
  mkdir -p "$work/$1"
  tar -xf "$work/$1.tar.xz" -C "$work/$1" --strip-components=1
}
fetch src "$URL/openmp-${LLVM_VERSION}.src.tar.xz" "$OPENMP_SHA256"
fetch cmake "$URL/cmake-${LLVM_VERSION}.src.tar.xz" "$CMAKE_SHA256"   # LLVM's shared CMake modules

for arch in "${archs[@]}"; do
  target=$(target_for "$arch")
  prefix="$PREFIX_ROOT/$arch"
  echo "== libomp $LLVM_VERSION for $arch, macOS >= $target -> $prefix"
  rm -rf "$work/build-$arch" "$prefix"
  # CFLAGS & co. of the wheel build must not leak into the runtime's own build
  env -u CFLAGS -u CXXFLAGS -u LDFLAGS -u CPPFLAGS -u ARCHFLAGS \
    MACOSX_DEPLOYMENT_TARGET="$target" \
    cmake -S "$work/src" -B "$work/build-$arch" \
      -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_INSTALL_PREFIX="$prefix" \
      -DCMAKE_OSX_ARCHITECTURES="$arch" \
      -DCMAKE_OSX_DEPLOYMENT_TARGET="$target" \
      -DLIBOMP_INSTALL_ALIASES=OFF \
      -DLIBOMP_OMPD_SUPPORT=OFF \
      -DOPENMP_ENABLE_LIBOMPTARGET=OFF \
      -DOPENMP_ENABLE_OMPT_TOOLS=OFF \
      -Wno-dev
  cmake --build "$work/build-$arch" --parallel "$(sysctl -n hw.ncpu)"
  cmake --install "$work/build-$arch"
  lib="$prefix/lib/libomp.dylib"
  install_name_tool -id "$lib" "$lib"
  # what delocate will check: the arch and the minimum macOS version of the library
  lipo -archs "$lib"
  otool -l "$lib" | grep -A4 -E 'LC_BUILD_VERSION|LC_VERSION_MIN_MACOSX' | grep -E 'minos|version' | head -2
  otool -D "$lib"
  test -f "$prefix/include/omp.h"
done
