#!/usr/bin/env bash
# Regenerates the protobuf code of proto/*.proto (`make proto`):
#   * middleware/_proto/{profile,push}_pb2.py (+ .pyi) with the protoc bundled in grpcio-tools, installed
#     in a throwaway virtualenv (the generated code needs protobuf >= its gencode version at
#     runtime; grpcio-tools 1.85.1 bundles libprotoc 35.1, whose gencode the pinned
#     protobuf==7.36.2 in requirements.txt accepts);
#   * csrc/gen/{profile,push}.pb-c.{c,h} with protoc-c (Debian's protobuf-c-compiler).
# profile.proto is pprof's profile (the exporter writes it, middleware/pprof.py reads it);
# push.proto is push.v1.PushRequest (the native uploader's push API, `serve`'s decoder).
# All outputs are committed; never run clang-format on csrc/gen.
set -euo pipefail
cd "$(dirname "$0")/.."

GRPCIO_TOOLS_VERSION=${GRPCIO_TOOLS_VERSION:-1.85.1}
GEN_VENV=${GEN_VENV:-${TMPDIR:-/tmp}/mw-protogen-$GRPCIO_TOOLS_VERSION}
PYTHON=${PYTHON:-python3}

if [ ! -x "$GEN_VENV/bin/python" ] || ! "$GEN_VENV/bin/python" -c "import grpc_tools.protoc" 2>/dev/null; then
  echo "gen-proto: installing grpcio-tools==$GRPCIO_TOOLS_VERSION into $GEN_VENV"
  "$PYTHON" -m venv "$GEN_VENV"
  "$GEN_VENV/bin/pip" install -q --disable-pip-version-check "grpcio-tools==$GRPCIO_TOOLS_VERSION"
fi

mkdir -p middleware/_proto csrc/gen
"$GEN_VENV/bin/python" -m grpc_tools.protoc -Iproto \
  --python_out=middleware/_proto --pyi_out=middleware/_proto proto/profile.proto proto/push.proto
echo "gen-proto: wrote middleware/_proto/{profile,push}_pb2.py{,i} ($("$GEN_VENV/bin/python" -m grpc_tools.protoc --version))"

command -v protoc-c >/dev/null || { echo "gen-proto: protoc-c missing (apt-get install protobuf-c-compiler)" >&2; exit 1; }
protoc-c --c_out=csrc/gen -Iproto proto/profile.proto
echo "gen-proto: wrote csrc/gen/profile.pb-c.{c,h} ($(protoc-c --version | head -1))"

# push.v1.PushRequest for the native uploader's optional push API.
protoc-c --c_out=csrc/gen -Iproto proto/push.proto
echo "gen-proto: wrote csrc/gen/push.pb-c.{c,h} ($(protoc-c --version | head -1))"
