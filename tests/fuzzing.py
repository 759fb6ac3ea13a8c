"""Hostile ModelInfer requests, for the fuzz test (CI) and the fuzz benchmark (100,000+).

Requests are built field by field from the served models' configs: each field is either
right or wrong in one of the ways a careless or hostile client gets it wrong, and the
request remembers what was made wrong (its faults). That makes an oracle: a request with
no fault must be answered OK with the outputs its model declares; one with faults must be
refused, NOT_FOUND or INVALID_ARGUMENT for a bad model or version and INVALID_ARGUMENT for
the rest. Encoded valid requests are also mutated byte by byte: what no longer parses must
get INVALID_ARGUMENT, what still parses one of the statuses a malformed request may get.
Never UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from salvo.domain.config import ModelConfig
from salvo.domain.datatypes import DATATYPES
from salvo_client.proto import grpc_service_pb2 as pb

Code = grpc.StatusCode
ALLOWED = frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED})
"""What any malformed or hostile request may get (issue 7)."""
INFER = "/inference.GRPCInferenceService/ModelInfer"
TRACEBACK = "Traceback (most recent call last)"
UNEXPECTED_LOG = (TRACEBACK, "unexpected error", "Unexpected [")
"""What the server logs only for a bug: a traceback, its own or grpc.aio's."""

HOSTILE_NAMES = [
    "", ".", "..", "../mlp", "mlp/../mlp", "/etc/passwd", "mlp/1", "..\\mlp", "mlp\x00",
    "MLP", " mlp", "mlp ", "%2e%2e%2fmlp", "~", "a" * 300, "mlp\n", "ｍｌｐ", "con",
]  # fmt: skip
HOSTILE_VERSIONS = [
    "0", "2", "-1", "+1", " 1", "1 ", "1.0", "1e0", "0x1", "1_0", "abc", "²", "¹", "١", "١١",
    "99999999999999999999999999", "\x00", "١٠",
]  # fmt: skip
FAULTS = (
    "model", "version", "datatype", "shape", "contents_size", "contents_field",
    "input_name", "duplicate_input", "missing_input", "extra_raw", "output_name",
    "duplicate_output", "parameter",
)  # fmt: skip
"""Each makes a request definitely invalid: "model" and "version" NOT_FOUND (or
INVALID_ARGUMENT for a name no model can have), the others INVALID_ARGUMENT."""
PARAMETER_KEYS = ["priority", "timeout", "cache", "binary_data_output", "sequence_id", ""]
MAX_ELEMENTS = 1 << 20
"""Contents are generated to match a declared shape only up to this many elements."""


def _means_version_1(text: str) -> bool:
    """Whether a served version 1 answers to `text` ("01" does; "١" and " 1" do not)."""
    return text.isascii() and text.isdigit() and int(text) == 1


@dataclass(frozen=True)
class Case:
    """One request to send, and what makes its answer right."""

    payload: bytes
    """The encoded ModelInferRequest (possibly mutated so that it no longer parses)."""
    served: frozenset[str]
    faults: tuple[str, ...] = ()
    expect: dict[str, tuple[int, ...]] | None = None
    """Output name → shape that an OK answer must carry (None: not known, not checked)."""
    may_time_out: bool = False
    """It carries a short `timeout` parameter: DEADLINE_EXCEEDED is a right answer too."""
    mutated: bool = False
    """Bytes mutated: the oracle knows only whether it parses."""

    def problem(self, code: Code, details: str, response: bytes | None) -> str | None:
        """What is wrong with answer (`code`, `details`, `response`), or None if it is right."""
        allowed = ALLOWED | {Code.DEADLINE_EXCEEDED} if self.may_time_out else ALLOWED
        if code not in allowed:
            return f"status {code.name} is never a right answer: {details!r}"
        if code is not Code.OK and (not details or TRACEBACK in details):
            return f"{code.name} without a clean message: {details!r}"
        try:
            request = pb.ModelInferRequest.FromString(self.payload)
        except DecodeError:
            return None if code is Code.INVALID_ARGUMENT else f"undecodable bytes got {code.name}"
        if request.model_name not in self.served and code not in (
            Code.NOT_FOUND,
            Code.INVALID_ARGUMENT,
        ):
            return f"model {request.model_name!r} is not served, yet the answer is {code.name}"
        if self.mutated:
            return None
        if not self.faults:
            if code is Code.OK:
                return _wrong_outputs(request, self.expect, response)
            if code is Code.DEADLINE_EXCEEDED:
                return None
            return f"valid request refused with {code.name}: {details!r}"
        wanted = (
            (Code.NOT_FOUND, Code.INVALID_ARGUMENT)
            if {"model", "version"} & set(self.faults)
            else (Code.INVALID_ARGUMENT,)
        )
        if code not in wanted:
            return f"faults {self.faults} got {code.name}, expected {wanted[0].name}: {details!r}"
        return None


def _wrong_outputs(
    request: pb.ModelInferRequest, expect: dict[str, tuple[int, ...]] | None, raw: bytes | None
) -> str | None:
    if raw is None or expect is None:
        return None
    response = pb.ModelInferResponse.FromString(raw)
    if response.id != request.id:
        return f"id {request.id!r} came back as {response.id!r}"
    got = {o.name: tuple(o.shape) for o in response.outputs}
    if got != expect or len(response.raw_output_contents) != len(got):
        return f"outputs {got} ({len(response.raw_output_contents)} raw), expected {expect}"
    for output, data in zip(response.outputs, response.raw_output_contents, strict=True):
        size = DATATYPES[output.datatype].itemsize * int(np.prod(output.shape))
        if len(data) != size:
            return f"output '{output.name}' carries {len(data)} bytes, its shape needs {size}"
    return None


def _raw(datatype: str, count: int, rng: np.random.Generator) -> bytes:
    """Valid raw contents: random bits (NaN and Inf included: they are data)."""
    if datatype == "BYTES":
        return b"".join(len(b"ab").to_bytes(4, "little") + b"ab" for _ in range(count))
    if datatype == "BOOL":
        return rng.integers(0, 2, count, dtype=np.uint8).tobytes()
    return rng.bytes(count * DATATYPES[datatype].itemsize)


def _typed(datatype: str, count: int, rng: np.random.Generator, field: str | None = None):
    """Typed contents holding `count` values in `field` (the datatype's own by default)."""
    contents = pb.InferTensorContents()
    field = field or DATATYPES[datatype].contents_field or "fp32_contents"
    values = getattr(contents, field)
    if field == "bytes_contents":
        values.extend([b"x"] * count)
    elif field == "bool_contents":
        values.extend(rng.integers(0, 2, count).astype(bool).tolist())
    elif field in ("fp32_contents", "fp64_contents"):
        values.extend(rng.standard_normal(count).tolist())
    elif field.startswith("uint"):
        values.extend(rng.integers(0, 200, count).tolist())
    else:
        values.extend(rng.integers(-100, 100, count).tolist())
    return contents


def _shape_fault(draw, shape: list[int], spec_dims: tuple[int, ...], max_batch: int) -> list[int]:
    """`shape` made wrong for a tensor declared with `spec_dims` (-1: any size)."""
    kind = draw(st.sampled_from(["rank+", "rank-", "negative", "zero", "batch", "inner", "huge"]))
    if not shape or kind == "rank+":
        return [*shape, draw(st.integers(1, 3))]
    if kind == "rank-":
        return shape[:-1]
    if kind == "negative":
        i = draw(st.integers(0, len(shape) - 1))
        return [*shape[:i], draw(st.integers(-(2**63), -1)), *shape[i + 1 :]]
    if kind == "zero" and max_batch:
        return [0, *shape[1:]]
    if kind == "batch" and max_batch:
        return [max_batch + draw(st.integers(1, 3)), *shape[1:]]
    if kind == "huge":
        i = draw(st.integers(0, len(shape) - 1))
        return [*shape[:i], draw(st.integers(2**31, 2**63 - 1)), *shape[i + 1 :]]
    offset = 1 if max_batch else 0
    fixed = [i + offset for i, d in enumerate(spec_dims) if d > 0]
    if not fixed:  # every dimension may take any size: a wrong rank instead
        return [*shape, 2]
    i = draw(st.sampled_from(fixed))
    return [*shape[:i], shape[i] + draw(st.sampled_from([-1, 1, 7])), *shape[i + 1 :]]


def _count(shape: list[int]) -> int | None:
    """Elements in `shape`, or None where no contents can be made for it."""
    if any(d < 0 for d in shape):
        return None
    count = int(np.prod(shape, dtype=object)) if shape else 1
    return count if count <= MAX_ELEMENTS else None


def _other_text(draw, avoid: set[str]) -> str:
    return draw(st.text(max_size=12).filter(lambda s: s not in avoid))


def _parameters(draw, request: pb.ModelInferRequest, faulty: bool) -> bool:
    """Fill `request.parameters`; True if a short timeout may expire it in the queue."""
    may_time_out = False
    keys = st.sampled_from(PARAMETER_KEYS) | st.text(max_size=10)
    for key in draw(st.lists(keys, max_size=4, unique=True)):
        param = request.parameters[key]
        if key in ("priority", "timeout"):
            low = 1 if key == "timeout" else 0
            value = draw(st.integers(low, 2**63 - 1))
            if draw(st.booleans()):
                param.uint64_param = value
            else:
                param.int64_param = value
            may_time_out |= key == "timeout" and value < 10**9
            continue
        kind = draw(st.sampled_from(["bool", "int64", "uint64", "string", "double"]))
        if kind == "bool":
            param.bool_param = draw(st.booleans())
        elif kind == "int64":
            param.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif kind == "uint64":
            param.uint64_param = draw(st.integers(0, 2**64 - 1))
        elif kind == "string":
            param.string_param = draw(st.text(max_size=12))
        else:
            param.double_param = draw(st.floats(allow_nan=True))
    if faulty:
        key = draw(st.sampled_from(["priority", "timeout"]))
        bad = draw(st.sampled_from(["negative", "bool", "string", "double"]))
        param = request.parameters[key]
        if bad == "negative":
            param.int64_param = draw(st.integers(-(2**63), -1))
        elif bad == "bool":
            param.bool_param = draw(st.booleans())
        elif bad == "string":
            param.string_param = draw(st.sampled_from(["1", "soon", ""]))
        else:
            param.double_param = draw(st.floats(allow_nan=True))
    return may_time_out


@st.composite
def infer_requests(draw, configs: dict[str, ModelConfig], faulty: bool = True) -> Case:
    """A ModelInferRequest for one of `configs`, right or wrong field by field."""
    faults = (
        set(draw(st.lists(st.sampled_from(FAULTS), max_size=3, unique=True))) if faulty else set()
    )
    served = frozenset(configs)
    config = configs[draw(st.sampled_from(sorted(configs)))]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    name = config.name
    if "model" in faults:
        name = draw(st.sampled_from(HOSTILE_NAMES) | st.text(max_size=20))
        if name in served:
            faults.discard("model")
    version = draw(st.sampled_from(["", "1"]))
    if "version" in faults:
        version = draw(st.sampled_from(HOSTILE_VERSIONS) | st.text(max_size=6))
        if version == "" or _means_version_1(version):
            faults.discard("version")
    request = pb.ModelInferRequest(
        model_name=name, model_version=version, id=draw(st.text(max_size=16))
    )

    max_batch = config.max_batch_size
    batch = draw(st.integers(1, min(max_batch, 3))) if max_batch else 0
    use_raw = draw(st.booleans())
    target = draw(st.integers(0, len(config.inputs) - 1))
    for i, spec in enumerate(config.inputs):
        hit = i == target
        if hit and "missing_input" in faults:
            continue
        dims = [d if d > 0 else draw(st.integers(1, 4)) for d in spec.dims]
        shape = [batch, *dims] if max_batch else dims
        if hit and "shape" in faults:
            shape = _shape_fault(draw, shape, spec.dims, max_batch)
        datatype = spec.datatype
        if hit and "datatype" in faults:
            others = sorted(set(DATATYPES) - {datatype})
            text = draw(st.booleans())
            datatype = _other_text(draw, {datatype}) if text else draw(st.sampled_from(others))
        tensor_name = spec.name
        if hit and "input_name" in faults:
            tensor_name = _other_text(draw, {t.name for t in config.inputs})
        tensor = request.inputs.add(name=tensor_name, datatype=datatype, shape=shape)
        for key in draw(st.lists(st.text(max_size=8), max_size=2, unique=True)):
            tensor.parameters[key].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        known = datatype if datatype in DATATYPES else spec.datatype
        count = _count(shape)
        if count is not None and hit and "contents_size" in faults:
            wrong = count + draw(st.sampled_from([-1, 1, 2, 64]))
            count = wrong if wrong >= 0 else count + 1
        if count is None:
            count = draw(st.integers(0, 64))
        if use_raw:
            request.raw_input_contents.append(_raw(known, count, rng))
            if hit and "contents_field" in faults:  # both encodings on one input
                tensor.contents.CopyFrom(_typed(known, max(count, 1), rng))
        else:
            field = None
            if hit and "contents_field" in faults:
                own = DATATYPES[known].contents_field
                fields = [f.name for f in pb.InferTensorContents.DESCRIPTOR.fields]
                field = draw(st.sampled_from([f for f in fields if f != own]))
                count = max(count, 1)  # an empty wrong field would be no field at all
            tensor.contents.CopyFrom(_typed(known, count, rng, field))
        if hit and "duplicate_input" in faults:
            request.inputs.append(tensor)
            if use_raw:
                request.raw_input_contents.append(request.raw_input_contents[-1])
    if "extra_raw" in faults:
        request.raw_input_contents.append(draw(st.binary(max_size=16)))

    names = [o.name for o in config.outputs]
    asked = draw(st.lists(st.sampled_from(names), unique=True))
    for output in asked:
        request.outputs.add(name=output).parameters["binary_data"].bool_param = True
    if "output_name" in faults:
        request.outputs.add(name=_other_text(draw, set(names)))
    if "duplicate_output" in faults:
        twice = draw(st.sampled_from(names))
        request.outputs.add(name=twice)
        request.outputs.add(name=twice)
    may_time_out = _parameters(draw, request, "parameter" in faults)

    expect = None
    if not faults:
        batch_dims = [batch] if max_batch else []
        outputs = [o for o in config.outputs if not asked or o.name in asked]
        expect = {o.name: (*batch_dims, *o.dims) for o in outputs}
    return Case(request.SerializeToString(), served, tuple(sorted(faults)), expect, may_time_out)


MUTATIONS = ("flip", "set", "insert", "delete", "truncate", "duplicate", "varint")


@dataclass(frozen=True)
class Mutation:
    """One edit of a message's bytes; `at` is taken modulo the length, `size` and `data`
    feed the edit."""

    kind: str
    at: int
    size: int
    data: bytes


MUTATION_LISTS = st.lists(
    st.builds(
        Mutation,
        st.sampled_from(MUTATIONS),
        st.integers(0, 2**24),
        st.integers(1, 64),
        st.binary(min_size=1, max_size=12),
    ),
    min_size=1,
    max_size=4,
)


def random_mutations(rng: random.Random) -> list[Mutation]:
    """What MUTATION_LISTS draws, from a plain PRNG: cheap, for runs of 100,000+."""
    return [
        Mutation(
            rng.choice(MUTATIONS),
            rng.randrange(2**24),
            rng.randint(1, 64),
            rng.randbytes(rng.randint(1, 12)),
        )
        for _ in range(rng.randint(1, 4))
    ]


def mutated(base: Case, mutations: list[Mutation]) -> Case:
    """`base`'s bytes with `mutations` applied in turn."""
    data = bytearray(base.payload)
    for m in mutations:
        at = m.at % (len(data) + 1)
        if m.kind == "flip" and at < len(data):
            data[at] ^= m.data[0] or 1
        elif m.kind == "set" and at < len(data):
            data[at] = m.data[0]
        elif m.kind == "insert":
            data[at:at] = m.data
        elif m.kind == "delete":
            del data[at : at + m.size % 16 + 1]
        elif m.kind == "truncate":
            del data[at:]
        elif m.kind == "duplicate":
            data[at:at] = data[at : at + m.size]
        elif m.kind == "varint":  # an over-long varint: a length or tag that cannot be
            data[at:at] = b"\xff" * (5 + m.size % 7)
    payload = bytes(data)
    try:
        timeout = pb.ModelInferRequest.FromString(payload).parameters.get("timeout")
    except DecodeError:
        timeout = None
    return Case(payload, base.served, ("bytes",), None, timeout is not None, mutated=True)


@st.composite
def mutated_requests(draw, configs: dict[str, ModelConfig]) -> Case:
    """The bytes of a valid request, mutated from one to four times."""
    return mutated(draw(infer_requests(configs, faulty=False)), draw(MUTATION_LISTS))


def send(method: grpc.UnaryUnaryMultiCallable, case: Case, timeout_s: float = 60) -> str | None:
    """Send `case` through a generic method (identity serializers); the problem, if any."""
    try:
        response = method(case.payload, timeout=timeout_s)
    except grpc.RpcError as exc:
        return case.problem(exc.code(), exc.details() or "", None)
    return case.problem(Code.OK, "", response)


def generic_infer(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """ModelInfer taking and returning bytes, so that anything can be sent."""
    return channel.unary_unary(INFER, request_serializer=None, response_deserializer=None)
