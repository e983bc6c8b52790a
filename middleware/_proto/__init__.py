"""Generated protobuf bindings for pprof's profile.proto (see proto/profile.proto).

``profile_pb2`` is produced by ``make proto`` (scripts/gen-proto.sh); do not edit it by hand.
"""
from middleware._proto import profile_pb2

__all__ = ["profile_pb2"]
