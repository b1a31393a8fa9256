#!/usr/bin/env bash
# Builds bench/uws/server.cpp against uWebSockets and uSockets (no TLS, no zlib), for
# the side-by-side runs in bench/scripts/compare.sh. Sources: UWS_SRC (a uWebSockets
# checkout with its uSockets submodule) or, by default, a shallow clone from GitHub into
# bench/uws/src. Output: bench/uws/uws-server.
#
#   bash bench/uws/build.sh
#   UWS_SRC=/path/to/uWebSockets bash bench/uws/build.sh
set -euo pipefail
cd "$(dirname "$0")"
SRC=${UWS_SRC:-src/uWebSockets}
if [ ! -f "$SRC/src/App.h" ]; then
  git clone --depth 1 --recurse-submodules --shallow-submodules https://github.com/uNetworking/uWebSockets "$SRC"
fi
[ -f "$SRC/uSockets/src/libusockets.h" ] || { echo "$SRC/uSockets is empty: git submodule update --init" >&2; exit 2; }
echo "uWebSockets $(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
OBJ=$(mktemp -d)
# As uSockets' own Makefile builds it without TLS: epoll, every C file.
for c in "$SRC"/uSockets/src/*.c "$SRC"/uSockets/src/eventing/*.c "$SRC"/uSockets/src/crypto/*.c \
         "$SRC"/uSockets/src/io_uring/*.c; do
  cc -std=c11 -O3 -flto -DLIBUS_NO_SSL -I"$SRC/uSockets/src" -c "$c" -o "$OBJ/$(basename "$c" .c).o"
done
c++ -std=c++20 -O3 -flto -DLIBUS_NO_SSL -DUWS_NO_ZLIB -I"$SRC/src" -I"$SRC/uSockets/src" \
  server.cpp "$OBJ"/*.o -o uws-server -lpthread
rm -rf "$OBJ"
echo "built bench/uws/uws-server"
