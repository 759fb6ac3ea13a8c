"""Request templates against the parse and the plan they stand in for.

Whatever bytes `RequestTemplates` recognises as a template's (a `Matched`), its `prepared`
must be exactly what the plan makes of those bytes parsed, and its fingerprint what the
parsed message's is; whatever it does not recognise it hands on parsed (or `Undecodable`),
and it never raises.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salvo.domain.tensors import ALIGNMENT, aligned_view
from salvo.domain.types import Prepared
from salvo.frontends.grpc.codec import decode_parameters
from salvo.frontends.grpc.messages import MessageRequest, WirePlans
from salvo.frontends.grpc.parsing import Undecodable
from salvo.frontends.grpc.wire.plan import WirePlan
from salvo.frontends.grpc.wire.templates import (
    _MAX_LEARNT_BYTES,
    _MAX_PEERS,
    _MAX_REFUSALS,
    _MAX_TEMPLATES,
    Matched,
    PeerTemplates,
    RequestTemplates,
)
from salvo_client.proto import grpc_service_pb2 as pb
from tests.unit.test_wire import (
    BATCHED,
    MUTATIONS,
    UNBATCHED,
    _mutate,
    assert_same,
    common_request,
    general,
)


def perf_analyzers(rows: int, request_id: str = "", seed: int = 0) -> pb.ModelInferRequest:
    """A request as perf_analyzer sends it: an output named, a parameter it does not act on."""
    request = common_request(BATCHED, rows, request_id)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.outputs.add(name="y")
    rng = np.random.default_rng(seed)
    for i, raw in enumerate(request.raw_input_contents):
        request.raw_input_contents[i] = rng.bytes(len(raw))
    return request


def decode(plan: WirePlan, message: pb.ModelInferRequest) -> Prepared | None:
    return plan.decode(message, decode_parameters(message))


def read_and_learn(templates: RequestTemplates, plan: WirePlan, data: bytes) -> object:
    """What `templates` reads of `data`, learnt as the data plane does it: a parsed
    message the plan takes becomes a template."""
    got = templates.read(data)
    if isinstance(got, pb.ModelInferRequest):
        prepared = decode(plan, got)
        if prepared is not None:
            templates.learn(got, data, prepared, plan)
    return got


def learnt(plan: WirePlan, request: pb.ModelInferRequest) -> RequestTemplates:
    """Templates that have seen `request` once."""
    templates = RequestTemplates()
    got = read_and_learn(templates, plan, request.SerializeToString())
    assert isinstance(got, pb.ModelInferRequest)
    return templates


def matched(templates: RequestTemplates, request: pb.ModelInferRequest) -> Matched:
    got = templates.read(request.SerializeToString())
    assert isinstance(got, Matched), type(got)
    return got


def fingerprint_of(message: pb.ModelInferRequest) -> bytes | None:
    return MessageRequest(message, WirePlans()).fingerprint()


@pytest.mark.parametrize("request_id", ["", "7", "é" * 40])
@pytest.mark.parametrize(("config", "rows"), [(BATCHED, 1), (BATCHED, 8), (UNBATCHED, 1)])
def test_a_request_like_one_seen_decodes_from_its_bytes_as_the_plan_decodes_it(
    config, rows, request_id
) -> None:
    plan = WirePlan(config, 1)
    templates = learnt(plan, common_request(config, rows))
    later = common_request(config, rows, request_id)
    for i, raw in enumerate(later.raw_input_contents):  # new tensors, the same lengths
        later.raw_input_contents[i] = bytes(reversed(raw))
    got = matched(templates, later)
    assert (got.model_name, got.model_version, got.id) == (config.name, "", request_id)
    prepared = got.prepared(plan)
    assert prepared is not None
    assert_same(prepared, general(config, later))
    assert not any(a.flags.writeable for a in prepared.inputs)  # views of the bytes
    # Aligned as a parsed tensor's bytes are, which CPU kernels' rounding depends on.
    assert all(a.ctypes.data % ALIGNMENT == 0 for a in prepared.inputs)
    assert got.message() == later
    # The cache's alias of the request: what the parsed message's fingerprint is.
    assert got.fingerprint() == fingerprint_of(later) is not None


def test_perf_analyzers_requests_match_whatever_their_id_and_tensors() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(2))
    for seed in range(5):
        later = perf_analyzers(2, request_id=str(seed * 1000), seed=seed)
        got = matched(templates, later)
        prepared = got.prepared(plan)
        assert prepared is not None
        assert prepared.parameters == {"triton_enable_empty_final_response": True}
        assert_same(prepared, general(BATCHED, later))
        assert got.fingerprint() is None  # parameters: no alias, as for the parsed message
    # Another batch size is another template, learnt the same way.
    assert not isinstance(templates.read(perf_analyzers(3).SerializeToString()), Matched)


def test_a_template_of_a_replaced_model_is_not_used() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(1))
    got = matched(templates, perf_analyzers(1, seed=1))
    assert got.prepared(WirePlan(BATCHED, 1)) is None  # the request is parsed instead


def test_a_matched_request_of_a_replaced_model_is_parsed_and_learnt_anew() -> None:
    """Through MessageRequest, as the servicer uses it: the old template gives way."""
    plans = WirePlans()
    templates = RequestTemplates()
    first = perf_analyzers(1).SerializeToString()
    read = templates.read(first)
    assert isinstance(read, pb.ModelInferRequest)
    MessageRequest(read, plans, templates=templates, data=first).prepare(BATCHED, 1)
    later = perf_analyzers(1, seed=1)
    read = templates.read(later.SerializeToString())
    assert isinstance(read, Matched)
    reloaded = BATCHED.model_copy()  # a reload: a new config object, so a new plan
    request = MessageRequest(read, plans, templates=templates, data=later.SerializeToString())
    assert_same(request.prepare(reloaded, 1), general(BATCHED, later))
    again = templates.read(perf_analyzers(1, seed=2).SerializeToString())
    assert isinstance(again, Matched) and again.prepared(plans.get(reloaded, 1)) is not None


def test_only_bytes_a_serializer_would_write_become_a_template() -> None:
    plan = WirePlan(BATCHED, 1)
    request = perf_analyzers(1)
    # The same message with its tensors' bytes first: it parses the same, but the bytes
    # before the tensors are not what a template takes them for.
    tensors = pb.ModelInferRequest(raw_input_contents=request.raw_input_contents)
    rest = pb.ModelInferRequest()
    rest.CopyFrom(request)
    del rest.raw_input_contents[:]
    data = tensors.SerializeToString() + rest.SerializeToString()
    templates = RequestTemplates()
    assert read_and_learn(templates, plan, data) == request
    assert not isinstance(templates.read(data), Matched)
    assert not templates._templates


def test_templates_start_again_from_none_when_full() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = RequestTemplates()
    names = [f"m{i}" for i in range(_MAX_TEMPLATES + 1)]
    for name in names:
        request = perf_analyzers(1)
        request.model_name = name
        read_and_learn(templates, plan, request.SerializeToString())
    assert len(templates._templates) == 1  # the last one, in a table emptied when full
    request = perf_analyzers(1, seed=3)
    request.model_name = names[-1]
    assert isinstance(templates.read(request.SerializeToString()), Matched)


def test_unary_templates_are_kept_per_connection_and_bounded() -> None:
    peers = PeerTemplates()
    one, other = peers.of("ipv4:10.0.0.7:5000"), peers.of("ipv4:10.0.0.7:5001")
    assert one is not None and other is not None and one is not other
    assert peers.of("ipv4:10.0.0.7:5000") is one
    plan = WirePlan(BATCHED, 1)
    read_and_learn(one, plan, perf_analyzers(1).SerializeToString())
    later = perf_analyzers(1, seed=1).SerializeToString()
    assert isinstance(one.read(later), Matched)
    assert not isinstance(other.read(later), Matched)  # another connection learns its own
    assert peers.of("ipv6:[::1]:5000") is not None
    # A peer that names no connection (a Unix socket's is the same for all) gets none.
    assert peers.of("unix:/run/salvo.sock") is None
    for port in range(_MAX_PEERS):
        peers.of(f"ipv4:10.0.0.8:{port}")
    assert len(peers._by_peer) == _MAX_PEERS
    assert peers.of("ipv4:10.0.0.7:5000") is not one  # the oldest went first


@settings(max_examples=300, deadline=None)
@given(
    config=st.sampled_from([BATCHED, UNBATCHED]),
    rows=st.integers(1, BATCHED.max_batch_size),
    mutations=st.lists(st.tuples(MUTATIONS, st.integers(0, 16)), max_size=3),
    request_id=st.text(max_size=140),
)
def test_whatever_is_matched_is_what_the_plan_makes_of_the_parse(
    config, rows, mutations, request_id
) -> None:
    """Requests that differ from a template in any way, right or wrong: matched only when
    they are the template's bar id and tensors, and then decoded as the plan decodes them."""
    rows = rows if config.max_batch_size else 1
    plan = WirePlan(config, 1)
    templates = learnt(plan, common_request(config, rows))
    later = common_request(config, rows, request_id)
    for mutation, value in mutations:
        if mutation != "none":
            _mutate(later, mutation, value)
    got = templates.read(later.SerializeToString())
    if not isinstance(got, Matched):
        assert got == later
        return
    prepared = got.prepared(plan)
    assert prepared is not None
    assert_same(prepared, decode(plan, later))
    assert_same(prepared, general(config, later))
    assert got.fingerprint() == fingerprint_of(later)


@settings(max_examples=300, deadline=None)
@given(prefix=st.integers(0, 400), garbage=st.binary(max_size=64), cut=st.booleans())
def test_bytes_near_a_template_never_raise_and_decode_only_as_a_parse_would(
    prefix, garbage, cut
) -> None:
    plan = WirePlan(BATCHED, 1)
    data = perf_analyzers(2).SerializeToString()
    templates = learnt(plan, perf_analyzers(2))
    mangled = data[:prefix] + garbage + (b"" if cut else data[prefix + len(garbage) :])
    got = templates.read(mangled)
    if isinstance(got, Undecodable):
        return
    if isinstance(got, Matched):
        parsed = got.message()
        prepared = got.prepared(plan)
        assert prepared is not None
        assert_same(prepared, general(BATCHED, parsed))
    else:
        assert got == pb.ModelInferRequest.FromString(mangled)


def test_an_id_that_is_not_utf8_is_left_to_the_parse_to_refuse() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(1))
    data = perf_analyzers(1, request_id="ab").SerializeToString().replace(b"ab", b"\xff\xfe", 1)
    got = templates.read(data)
    assert isinstance(got, Undecodable) and "malformed request message" in got.reason


def test_a_request_over_a_mebibyte_is_never_learnt() -> None:
    config = BATCHED.model_copy(update={"max_batch_size": 1 << 16})
    plan = WirePlan(config, 1)
    rows = _MAX_LEARNT_BYTES // 44 + 1  # 44 bytes a row: three FP32 and four INT64
    data = common_request(config, rows).SerializeToString()
    assert len(data) > _MAX_LEARNT_BYTES
    templates = RequestTemplates()
    read_and_learn(templates, plan, data)
    assert not templates._templates
    assert not isinstance(templates.read(data), Matched)


def test_a_request_ending_in_unknown_fields_is_never_learnt() -> None:
    """Unknown fields serialize after the tensors: such bytes round-trip, but a template of
    them would read every tensor that many bytes late."""
    plan = WirePlan(UNBATCHED, 1)
    unknown = b"\xa0\x06\x01"  # field 100, a varint: not ModelInferRequest's

    def request(raw: bytes) -> bytes:
        message = pb.ModelInferRequest(model_name="flat")
        message.inputs.add(name="a", datatype="UINT8", shape=[4])
        message.raw_input_contents.append(raw)
        return message.SerializeToString() + unknown

    templates = RequestTemplates()
    message = templates.read(request(b"\0\0\0\0"))
    assert isinstance(message, pb.ModelInferRequest)
    assert message.SerializeToString() == request(b"\0\0\0\0")  # it does round-trip
    prepared = decode(plan, message)
    assert prepared is not None
    templates.learn(message, request(b"\0\0\0\0"), prepared, plan)
    later = templates.read(request(b"\0\0\0\x07"))
    assert isinstance(later, pb.ModelInferRequest)
    prepared = decode(plan, later)
    assert prepared is not None and prepared.inputs[0].tolist() == [0, 0, 0, 7]


def test_a_kind_of_request_that_never_matches_its_bytes_is_tried_a_few_times_only() -> None:
    plan = WirePlan(BATCHED, 1)
    request = perf_analyzers(1)
    name = pb.ModelInferRequest(model_name=request.model_name)
    tensors = pb.ModelInferRequest(raw_input_contents=request.raw_input_contents)
    rest = pb.ModelInferRequest()
    rest.CopyFrom(request)
    rest.ClearField("model_name")
    del rest.raw_input_contents[:]
    # The name, then the tensors, then the rest: it parses as the request, yet is not what
    # serializing the request gives.
    data = name.SerializeToString() + tensors.SerializeToString() + rest.SerializeToString()
    assert pb.ModelInferRequest.FromString(data) == request
    templates = RequestTemplates()
    for _ in range(_MAX_REFUSALS + 3):
        read_and_learn(templates, plan, data)
    assert list(templates._refusals.values()) == [_MAX_REFUSALS]
    assert not templates._templates


def test_matched_requests_share_parameters_that_cannot_be_changed() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(1))
    first = matched(templates, perf_analyzers(1, seed=1)).prepared(plan)
    second = matched(templates, perf_analyzers(1, seed=2)).prepared(plan)
    assert first is not None and second is not None
    assert first.parameters == second.parameters == {"triton_enable_empty_final_response": True}
    with pytest.raises(TypeError):
        first.parameters["priority"] = 1  # type: ignore[index]


def test_a_kind_of_request_that_keeps_changing_is_learnt_a_few_times_only() -> None:
    """A parameter whose value changes every request (its length does not): each request
    would replace the template, serializing the message every time."""
    plan = WirePlan(BATCHED, 1)
    templates = RequestTemplates()

    def tagged(value: int) -> bytes:
        # One parameter only: a map of several serializes in an order of its own.
        request = common_request(BATCHED, 1)
        request.parameters["tag"].string_param = f"{value:04d}"
        return request.SerializeToString()

    for value in range(_MAX_REFUSALS + 4):
        assert isinstance(read_and_learn(templates, plan, tagged(value)), pb.ModelInferRequest)
    assert list(templates._refusals.values()) == [_MAX_REFUSALS]
    # The template kept is the last one learnt, and still answers its own kind.
    assert isinstance(templates.read(tagged(_MAX_REFUSALS)), Matched)
    assert not isinstance(templates.read(tagged(_MAX_REFUSALS + 1)), Matched)


def test_a_request_naming_its_id_twice_is_never_a_template() -> None:
    """The last id wins in a parse; a template of such bytes would answer with the first."""
    plan = WirePlan(BATCHED, 1)

    def twice(first: str) -> bytes:
        head = pb.ModelInferRequest(model_name=BATCHED.name, id=first).SerializeToString()
        rest = perf_analyzers(1, request_id="zz")
        rest.ClearField("model_name")
        return head + rest.SerializeToString()

    templates = RequestTemplates()
    message = read_and_learn(templates, plan, twice("aa"))
    assert isinstance(message, pb.ModelInferRequest) and message.id == "zz"
    later = templates.read(twice("bb"))
    assert isinstance(later, pb.ModelInferRequest) and later.id == "zz"


def test_a_models_answer_does_not_depend_on_where_its_bytes_lay() -> None:
    """CPU kernels round unaligned input differently: `aligned_view` copies what is not
    aligned, so a tensor read at any offset of a message gives the parsed tensor's answer."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    x = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x.copy())).numpy()
        for offset in range(2 * ALIGNMENT):
            array = aligned_view(bytes(offset) + x.tobytes(), offset, x.dtype, x.shape)
            assert not array.flags.writeable
            assert array.ctypes.data % ALIGNMENT == 0
            np.testing.assert_array_equal(model(torch.from_numpy(array)).numpy(), want)
