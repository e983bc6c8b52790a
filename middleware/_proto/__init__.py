"""Generated protobuf bindings of the wire formats declared in ``proto/``.

* ``profile_pb2``: pprof's ``perftools.profiles.Profile`` (proto/profile.proto);
* ``push_pb2``: ``push.v1.PushRequest`` of the push API (proto/push.proto).

Both are produced by ``make proto`` (scripts/gen-proto.sh) and committed; do not edit them by
hand. Import the one you need (``from middleware._proto import push_pb2``): this package imports
neither by itself.
"""

__all__ = ["profile_pb2", "push_pb2"]
