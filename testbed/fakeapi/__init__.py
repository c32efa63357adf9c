"""A protocol-faithful fake Kubernetes API server for tests and benchmarks (see ``server``)."""

from testbed.fakeapi.server import (
    DEFAULT_KINDS,
    FakeApiServer,
    Kind,
    RequestRecord,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

__all__ = [
    "DEFAULT_KINDS",
    "FakeApiServer",
    "Kind",
    "RequestRecord",
    "SelectorError",
    "parse_field_selector",
    "parse_label_selector",
]
