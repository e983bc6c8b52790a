#!/usr/bin/env bash
# Regenerates the protobuf code of proto/*.proto (`make proto`):
#   * middleware/_proto/{profile,push}_pb2.py (+ .pyi) with the protoc bundled in grpcio-tools, installed
#     in a throwaway virtualenv (the generated code needs protobuf >= its gencode version at
#     runtime; grpcio-tools 1.85.1 bundles libprotoc 35.1, whose gencode the pinned
#     protobuf==7.36.2 in requirements.txt accepts);
#   * middleware/_proto/otlp/*_pb2.py (+ .pyi), OTLP profiles, the same way from a renamed copy
#     of proto/otlp (see below);
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

# OTLP profiles (proto/otlp/, vendored unmodified) -> middleware/_proto/otlp/<name>_pb2.py{,i}
# (middleware/otlp.py). They are generated from a rewritten copy, not from proto/otlp itself: an
# app using OpenTelemetry may import the official opentelemetry-proto package (any version) into
# the same process, and its modules register the files "opentelemetry/proto/.../*.proto" and the
# messages "opentelemetry.proto.*" in protobuf's default descriptor pool; a second registration
# of the same file name or full message name with other contents fails at import. The copy puts
# each file at middleware/_proto/otlp/<name>.proto and each package under middleware.otlp.*
# (imports and qualified type names rewritten to match). The wire format depends only on field
# numbers and types, which are untouched, so the bytes are OTLP's (tests/unit/test_otlp.py decodes
# them with the official package).
OTLP_SRC=proto/otlp/opentelemetry/proto
OTLP_TMP=$(mktemp -d)
mkdir -p "$OTLP_TMP/middleware/_proto/otlp" middleware/_proto/otlp
for src in common/v1/common resource/v1/resource profiles/v1development/profiles \
           collector/profiles/v1development/profiles_service; do
  sed -E \
    -e 's#^import "opentelemetry/proto/[a-z0-9_/]*/([a-z_]+)\.proto";#import "middleware/_proto/otlp/\1.proto";#' \
    -e 's#^package opentelemetry\.proto\.#package middleware.otlp.#' \
    -e 's#([ (])opentelemetry\.proto\.#\1middleware.otlp.#g' \
    "$OTLP_SRC/$src.proto" >"$OTLP_TMP/middleware/_proto/otlp/$(basename "$src").proto"
done
if grep -n '^[^/]*opentelemetry\.proto\.' "$OTLP_TMP"/middleware/_proto/otlp/*.proto | grep -v '_package\|_namespace'; then
  echo "gen-proto: an OTLP reference was not rewritten (above)" >&2; rm -rf "$OTLP_TMP"; exit 1
fi
"$GEN_VENV/bin/python" -m grpc_tools.protoc -I"$OTLP_TMP" --python_out=. --pyi_out=. \
  "$OTLP_TMP"/middleware/_proto/otlp/*.proto
rm -rf "$OTLP_TMP"
# protoc's stubs write Mapping without type arguments, which `mypy --strict` refuses.
for stub in middleware/_proto/otlp/*_pb2.pyi; do
  sed -i '1i # mypy: disable-error-code="type-arg"' "$stub"
done
echo "gen-proto: wrote middleware/_proto/otlp/{common,resource,profiles,profiles_service}_pb2.py{,i}"

command -v protoc-c >/dev/null || { echo "gen-proto: protoc-c missing (apt-get install protobuf-c-compiler)" >&2; exit 1; }
protoc-c --c_out=csrc/gen -Iproto proto/profile.proto
echo "gen-proto: wrote csrc/gen/profile.pb-c.{c,h} ($(protoc-c --version | head -1))"

# push.v1.PushRequest for the native uploader's optional push API.
protoc-c --c_out=csrc/gen -Iproto proto/push.proto
echo "gen-proto: wrote csrc/gen/push.pb-c.{c,h} ($(protoc-c --version | head -1))"

# OTLP profiles (proto/otlp/, vendored unmodified) for the native uploader's OTLP exporter
# (csrc/mw_otlp.c): csrc/gen/otlp/opentelemetry/proto/**/<name>.pb-c.{c,h}, generated from the
# vendored files themselves (protobuf-c has no process-wide registry of names to collide with).
mkdir -p csrc/gen/otlp
protoc-c --c_out=csrc/gen/otlp -Iproto/otlp \
  proto/otlp/opentelemetry/proto/common/v1/common.proto \
  proto/otlp/opentelemetry/proto/resource/v1/resource.proto \
  proto/otlp/opentelemetry/proto/profiles/v1development/profiles.proto \
  proto/otlp/opentelemetry/proto/collector/profiles/v1development/profiles_service.proto
echo "gen-proto: wrote csrc/gen/otlp/opentelemetry/proto/**/*.pb-c.{c,h} ($(protoc-c --version | head -1))"
