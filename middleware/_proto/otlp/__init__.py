"""Generated protobuf bindings of OTLP profiles ``v1development`` (proto/otlp/, vendored unmodified
from opentelemetry-proto).

* ``common_pb2``: ``AnyValue``, ``KeyValue``, ``InstrumentationScope``;
* ``resource_pb2``: ``Resource``;
* ``profiles_pb2``: ``ProfilesDictionary``, ``ResourceProfiles``, ``ScopeProfiles``, ``Profile``...;
* ``profiles_service_pb2``: ``ExportProfilesServiceRequest`` / ``ExportProfilesServiceResponse``.

Produced by ``make proto`` (scripts/gen-proto.sh) from a copy whose files live at
``middleware/_proto/otlp/<name>.proto`` and whose packages are ``middleware.otlp.*``, so that they
never clash in protobuf's default descriptor pool with the official ``opentelemetry-proto``
package an application may import (the wire format is OTLP's: field numbers and types are
unchanged). Do not edit them by hand; this package imports none of them by itself.
"""

__all__ = ["common_pb2", "resource_pb2", "profiles_pb2", "profiles_service_pb2"]
