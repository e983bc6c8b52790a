# mypy: disable-error-code="type-arg"
from middleware._proto.otlp import profiles_pb2 as _profiles_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportProfilesServiceRequest(_message.Message):
    __slots__ = ("resource_profiles", "dictionary")
    RESOURCE_PROFILES_FIELD_NUMBER: _ClassVar[int]
    DICTIONARY_FIELD_NUMBER: _ClassVar[int]
    resource_profiles: _containers.RepeatedCompositeFieldContainer[_profiles_pb2.ResourceProfiles]
    dictionary: _profiles_pb2.ProfilesDictionary
    def __init__(self, resource_profiles: _Optional[_Iterable[_Union[_profiles_pb2.ResourceProfiles, _Mapping]]] = ..., dictionary: _Optional[_Union[_profiles_pb2.ProfilesDictionary, _Mapping]] = ...) -> None: ...

class ExportProfilesServiceResponse(_message.Message):
    __slots__ = ("partial_success",)
    PARTIAL_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    partial_success: ExportProfilesPartialSuccess
    def __init__(self, partial_success: _Optional[_Union[ExportProfilesPartialSuccess, _Mapping]] = ...) -> None: ...

class ExportProfilesPartialSuccess(_message.Message):
    __slots__ = ("rejected_profiles", "error_message")
    REJECTED_PROFILES_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    rejected_profiles: int
    error_message: str
    def __init__(self, rejected_profiles: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...
