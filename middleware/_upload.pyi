"""Types of middleware._upload, the native uploader (csrc/mw_module_upload.c method table).

Loaded by middleware._native.upload_start; the tracker calls it through middleware._native.
"""

from collections.abc import Sequence
from typing import Literal, overload

from typing_extensions import Buffer

def upload_start(
    *,
    server_url: str | None = None,
    app_name: str | None = None,
    tags: str | None = None,
    tenant_id: str | None = None,
    auth_url: str | None = None,
    api_key: str | None = None,
    bearer_token: str | None = None,
    basic_user: str | None = None,
    basic_password: str | None = None,
    spy_name: str | None = None,
    user_agent: str | None = None,
    sample_rate: int = 0,
    queue_max: int = 0,
    connect_timeout_s: float = 0.0,
    total_timeout_s: float = 0.0,
    backoff_initial_s: float = 0.0,
    backoff_max_s: float = 0.0,
    use_push_api: bool = False,
    ca_file: str | None = None,
    ca_path: str | None = None,
    exporter: str | None = None,
    otlp_headers: Sequence[tuple[str, str]] | None = None,
    resource_attributes: Sequence[tuple[str, str]] | None = None,
    sdk_version: str | None = None,
    otlp_gzip: bool = False,
) -> None: ...
def otlp_from_pprof(
    data: Buffer,
    service_name: str,
    sdk_version: str | None = None,
    resource_attributes: Sequence[tuple[str, str]] | None = ...,
    pid: int = 0,
    gzip: bool = False,
) -> bytes: ...
def upload_submit(data: Buffer, from_s: int, until_s: int, name: str = ..., /) -> bool: ...
def upload_flush(deadline: float, /) -> int: ...
def upload_stop(deadline: float, /) -> None: ...
def upload_running() -> bool: ...
def upload_stats() -> dict[str, int]: ...
@overload
def upload_take_message(with_level: Literal[False] = False) -> str | None: ...
@overload
def upload_take_message(with_level: Literal[True]) -> tuple[int, str] | None: ...
@overload
def upload_take_message(with_level: bool) -> str | tuple[int, str] | None: ...
