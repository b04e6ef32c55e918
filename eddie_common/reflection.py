"""Server reflection that keeps the proto comments, so `grpcurl describe` documents each RPC.

Generated `_pb2` modules embed descriptors without comments; `make generate`
also writes `generated/eddie/descriptors.binpb` (with source info), and this
module serves those file descriptors in place of the stripped ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

import eddie

DESCRIPTORS = Path(eddie.__file__).resolve().parent / "descriptors.binpb"


def _documented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    if not DESCRIPTORS.exists():
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes()).file
    return {f.name: f for f in files}


class _DocumentedFile:
    """A FileDescriptor whose CopyToProto includes the comments when we have them."""

    def __init__(self, descriptor: Any, documented: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        self._descriptor = descriptor
        self._documented = documented
        self.name: str = descriptor.name

    @property
    def dependencies(self) -> list[_DocumentedFile]:
        return [_DocumentedFile(d, self._documented) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        documented = self._documented.get(self.name)
        if documented is not None:
            proto.CopyFrom(documented)
        else:
            self._descriptor.CopyToProto(proto)


class _DocumentedPool:
    """The default descriptor pool, answering with documented files and resolving method names."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()
        self._documented = _documented_files()

    def FindFileByName(self, name: str) -> _DocumentedFile:
        return _DocumentedFile(self._pool.FindFileByName(name), self._documented)

    def FindFileContainingSymbol(self, symbol: str) -> _DocumentedFile:
        try:
            found = self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            # `package.Service.Method`: the file of the service.
            parent = symbol.rpartition(".")[0]
            found = self._pool.FindFileContainingSymbol(parent)
        return _DocumentedFile(found, self._documented)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    servicer = reflection.ReflectionServicer(service_names, pool=_DocumentedPool())  # type: ignore[arg-type]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
