"""Request templates: a connection's repeated requests read from their bytes, unparsed.

A client sends the same request over and over with new tensor bytes: every field before
`raw_input_contents` is byte for byte the last request's, bar the id. Once a version's
`WirePlan` has taken a request, its bytes become a template, and a later request of the
same connection whose bytes match it (the same model name, version and everything up to
the tensor bytes, the same lengths; any id) skips both the protobuf parse and the plan: a
`Matched`, whose `prepared` makes the request from views of its bytes (copies where they
do not lie aligned as a parsed tensor's bytes do: see `aligned_view`). Anything else is
parsed. For perf_analyzer's `mlp` request that is about 4 µs instead of 10 (parse and
plan), some 7% of a unary call's CPU in the server.

State is never shared across connections: each stream has its own `RequestTemplates`,
and unary calls have one per peer address and port (`PeerTemplates`), so what one client
sends never decides how another's bytes are read. A template is only ever a shortcut:
what it makes of bytes is exactly what the parse and the plan would make of them
(tests/unit/test_templates.py holds it to both, over mutated and mangled bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from salvo.domain.tensors import aligned_view
from salvo.domain.types import Prepared
from salvo.frontends.grpc.parsing import Undecodable
from salvo.frontends.grpc.wire import tag, varint
from salvo.frontends.grpc.wire.plan import WirePlan
from salvo_client.proto import grpc_service_pb2 as pb

_REQUEST = pb.ModelInferRequest.DESCRIPTOR
_NAME_TAG = tag(_REQUEST, "model_name")[0]
_VERSION_TAG = tag(_REQUEST, "model_version")[0]
_REQUEST_ID_TAG = tag(_REQUEST, "id")[0]
_RAW_INPUT_TAG = tag(_REQUEST, "raw_input_contents")
_MAX_TEMPLATES = 32
"""Templates kept per connection (they start again from none when full): one per model,
version and request length, and a connection rarely asks more than a few of those."""
_MAX_LEARNT_BYTES = 1 << 20
"""Requests larger than this are never learnt: learning serializes the whole message."""
_MAX_REFUSALS = 8
"""Times a kind of request (its key) may fail to become a template before `learn` stops
trying it: each try serializes the whole message, and some clients' bytes never match
what serializing gives (a map of several parameters comes out in hash order)."""
_MAX_PEERS = 1024
"""Connections whose unary templates are kept; the oldest goes first past it."""


def _header(data: bytes) -> tuple[int, str, int] | None:
    """Where the model name and version end, the id, and where the rest starts; None for
    bytes not laid out so (a name, version or id of 128 bytes or more included)."""
    size = len(data)
    if size < 2 or data[0] != _NAME_TAG or data[1] > 0x7F:
        return None
    end = 2 + data[1]
    if end + 1 < size and data[end] == _VERSION_TAG:
        if data[end + 1] > 0x7F:
            return None
        end += 2 + data[end + 1]
    start = end
    request_id = ""
    if start + 1 < size and data[start] == _REQUEST_ID_TAG:
        if data[start + 1] > 0x7F:
            return None
        start += 2 + data[start + 1]
        try:
            request_id = data[end + 2 : start].decode()
        except UnicodeDecodeError:  # the parse refuses it, with its own message
            return None
    return end, request_id, start


class _Template:
    """A request the plan took, as bytes: what follows the id up to the first input's bytes
    (`body`), where each input's bytes lie after the id and the header of each input but
    the first (`headers`), and what the plan made of it, bar its tensors (which it does
    not keep alive)."""

    __slots__ = (
        "plan", "model_name", "model_version", "body", "headers", "inputs",
        "outputs", "rows", "parameters",
    )  # fmt: skip

    def __init__(
        self,
        plan: WirePlan,
        message: pb.ModelInferRequest,
        body: bytes,
        headers: tuple[tuple[int, bytes], ...],
        inputs: tuple[tuple[int, np.dtype, tuple[int, ...]], ...],
        prepared: Prepared,
    ) -> None:
        self.plan = plan
        self.model_name = message.model_name
        self.model_version = message.model_version
        self.body = body
        self.headers = headers
        self.inputs = inputs
        self.outputs = prepared.outputs
        self.rows = prepared.rows
        # A copy: a view of the message's map would keep its tensors alive. Shared by
        # every request matched, so read-only.
        self.parameters: Mapping[str, object] = MappingProxyType(dict(prepared.parameters))


class Matched:
    """A ModelInferRequest known by its bytes to be a template's, bar its id and tensors.

    It answers `model_name`, `model_version` and `id` as the message would; `prepared` is
    what the plan would make of the message, `message` the message itself.
    """

    __slots__ = ("model_name", "model_version", "id", "template", "data", "_end", "_start")

    def __init__(
        self, template: _Template, data: bytes, request_id: str, end: int, start: int
    ) -> None:
        self.model_name = template.model_name
        self.model_version = template.model_version
        self.id = request_id
        self.template = template
        self.data = data
        self._end = end
        self._start = start

    def prepared(self, plan: WirePlan) -> Prepared | None:
        """The request, if `plan` is the one its template was learnt with (None once the
        model has been replaced: the caller parses `message` instead)."""
        template = self.template
        if template.plan is not plan:
            return None
        data, start = self.data, self._start
        return Prepared(
            model=plan.config.name,
            version=plan.version,
            id=self.id,
            inputs=tuple(
                [
                    aligned_view(data, start + offset, dtype, shape)
                    for offset, dtype, shape in template.inputs
                ]
            ),
            outputs=template.outputs,
            rows=template.rows,
            parameters=template.parameters,
        )

    def message(self) -> pb.ModelInferRequest:
        """The request parsed (it parses: its bytes differ from its template's only in the
        tensors' bytes and a valid id)."""
        return pb.ModelInferRequest.FromString(self.data)

    def fingerprint(self) -> bytes | None:
        """The bytes without the id: what serializing the message without its id gives
        (a template's bytes are the serializer's); None where it has parameters."""
        if self.template.parameters:
            return None
        data = self.data
        return data[: self._end] + data[self._start :]


class RequestTemplates:
    """One connection's templates: `read` gives a `Matched` for bytes that match one, else
    the parsed message (an `Undecodable` where it does not parse); `learn` makes a template
    of a parsed request the plan took.

    Kept by the model name and version bytes and the length after the id.
    """

    __slots__ = ("_templates", "_refusals")

    def __init__(self) -> None:
        self._templates: dict[tuple[bytes, int], _Template] = {}
        self._refusals: dict[tuple[bytes, int], int] = {}

    def read(self, data: bytes) -> Matched | pb.ModelInferRequest | Undecodable:
        header = _header(data)
        if header is not None:
            end, request_id, start = header
            template = self._templates.get((data[:end], len(data) - start))
            if template is not None and data.startswith(template.body, start):
                for offset, expected in template.headers:
                    if not data.startswith(expected, start + offset):
                        break
                else:
                    return Matched(template, data, request_id, end, start)
        return parse(data)

    def learn(
        self, message: pb.ModelInferRequest, data: bytes, prepared: Prepared, plan: WirePlan
    ) -> None:
        """A template of `message`, parsed from `data`, which `plan` made into `prepared`.
        Only where `data` is what serializing the message gives (so every field lies where
        a template expects it: the tensors' bytes last, in order)."""
        raws = message.raw_input_contents
        # Unknown fields are written back after the tensors: bytes with them at the end
        # would serialize to themselves, yet put the tensors where a template does not.
        if not raws or len(data) > _MAX_LEARNT_BYTES or len(UnknownFieldSet(message)):
            return
        header = _header(data)
        if header is None:
            return
        end, _, start = header
        key = (data[:end], len(data) - start)
        refusals = self._refusals.get(key, 0)
        if refusals >= _MAX_REFUSALS:
            return
        tags = [_RAW_INPUT_TAG + varint(len(raw)) for raw in raws]
        first = len(data) - sum(len(tag) + len(raw) for tag, raw in zip(tags, raws, strict=True))
        offset = first - start
        headers: list[tuple[int, bytes]] = []
        inputs: list[tuple[int, np.dtype, tuple[int, ...]]] = []
        for tag_bytes, raw, array in zip(tags, raws, prepared.inputs, strict=True):
            if not data.startswith(tag_bytes, start + offset):
                break
            if inputs:
                headers.append((offset, tag_bytes))
            offset += len(tag_bytes)
            inputs.append((offset, array.dtype, array.shape))
            offset += len(raw)
        if len(inputs) < len(raws) or message.SerializeToString() != data:
            self._refuse(key, refusals)
            return
        if len(self._templates) >= _MAX_TEMPLATES:
            self._templates.clear()
        replaced = self._templates.get(key)
        if replaced is not None and replaced.plan is plan:
            # Another request of the same kind, not a reloaded model's: a client that
            # changes what it sends (a parameter's value) would be learnt every time.
            self._refuse(key, refusals)
        body = data[start : first + len(tags[0])]
        self._templates[key] = _Template(
            plan, message, body, tuple(headers), tuple(inputs), prepared
        )

    def _refuse(self, key: tuple[bytes, int], refusals: int) -> None:
        """Count one more refusal of `key` (at most `_MAX_TEMPLATES` keys are counted)."""
        if len(self._refusals) >= _MAX_TEMPLATES and key not in self._refusals:
            self._refusals.clear()
        self._refusals[key] = refusals + 1


class PeerTemplates:
    """The templates of unary calls, one `RequestTemplates` per connection (a peer's
    address and port), at most `_MAX_PEERS` of them. A peer that names no connection (a
    Unix socket's) gets None: its calls are parsed."""

    __slots__ = ("_by_peer",)

    def __init__(self) -> None:
        self._by_peer: dict[str, RequestTemplates] = {}

    def of(self, peer: str) -> RequestTemplates | None:
        templates = self._by_peer.get(peer)
        if templates is None:
            if not peer.startswith(("ipv4:", "ipv6:")):
                return None
            if len(self._by_peer) >= _MAX_PEERS:
                del self._by_peer[next(iter(self._by_peer))]
            templates = self._by_peer[peer] = RequestTemplates()
        return templates


def parse(data: bytes) -> pb.ModelInferRequest | Undecodable:
    """`data` parsed as a ModelInferRequest, or an `Undecodable` saying why not."""
    try:
        return pb.ModelInferRequest.FromString(data)
    except DecodeError as exc:
        return Undecodable(f"malformed request message: {exc}")
