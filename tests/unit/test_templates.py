"""Request templates against the parse and the plan they stand in for.

Whatever bytes `RequestTemplates` recognises as a template's (a `Matched`), its `validated`
must be exactly what the plan makes of those bytes parsed; whatever it does not, it must
hand on parsed (or `Undecodable`), and it never raises.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salvo.parsing import Undecodable
from salvo.wire import _MAX_REFUSALS, _MAX_TEMPLATES, Matched, RequestTemplates, WirePlan
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


def learnt(plan: WirePlan, request: pb.ModelInferRequest) -> RequestTemplates:
    """Templates that have seen `request` once, through the plan as the servicer does it."""
    templates = RequestTemplates()
    message = templates(request.SerializeToString())
    assert isinstance(message, pb.ModelInferRequest)
    validated = plan.decode(message)
    assert validated is not None
    templates.learn(message, validated, plan)
    return templates


def matched(templates: RequestTemplates, request: pb.ModelInferRequest) -> Matched:
    got = templates(request.SerializeToString())
    assert isinstance(got, Matched), type(got)
    return got


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
    validated = got.validated(plan)
    assert validated is not None
    assert_same(validated, general(config, later))
    assert not any(a.flags.writeable for a in validated.inputs)  # views of the bytes
    assert got.message() == later


def test_perf_analyzers_requests_match_whatever_their_id_and_tensors() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(2))
    for seed in range(5):
        later = perf_analyzers(2, request_id=str(seed * 1000), seed=seed)
        validated = matched(templates, later).validated(plan)
        assert validated is not None
        assert validated.parameters == {"triton_enable_empty_final_response": True}
        assert_same(validated, general(BATCHED, later))
    # Another batch size is another template, learnt the same way.
    assert not isinstance(templates(perf_analyzers(3).SerializeToString()), Matched)


def test_a_template_of_a_replaced_model_is_not_used() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(1))
    got = matched(templates, perf_analyzers(1, seed=1))
    assert got.validated(WirePlan(BATCHED, 1)) is None  # the servicer parses got.message()


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
    message = templates(data)
    assert message == request
    templates.learn(message, plan.decode(message), plan)
    assert not isinstance(templates(data), Matched)
    # Only the last message parsed is learnt (the servicer learns as it checks each one).
    other = templates(perf_analyzers(2).SerializeToString())
    templates.learn(message, plan.decode(message), plan)
    templates.learn(other, plan.decode(other), plan)
    assert isinstance(templates(perf_analyzers(2).SerializeToString()), Matched)


def test_templates_start_again_from_none_when_full() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = RequestTemplates()
    names = [f"m{i}" for i in range(_MAX_TEMPLATES + 1)]
    for name in names:
        request = perf_analyzers(1)
        request.model_name = name
        message = templates(request.SerializeToString())
        templates.learn(message, plan.decode(message), plan)
    assert len(templates._templates) == 1  # the last one, in a table emptied when full
    request = perf_analyzers(1, seed=3)
    request.model_name = names[-1]
    assert isinstance(templates(request.SerializeToString()), Matched)


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
    got = templates(later.SerializeToString())
    if not isinstance(got, Matched):
        assert got == later
        return
    validated = got.validated(plan)
    assert validated is not None
    assert_same(validated, plan.decode(later))
    assert_same(validated, general(config, later))


@settings(max_examples=300, deadline=None)
@given(prefix=st.integers(0, 400), garbage=st.binary(max_size=64), cut=st.booleans())
def test_bytes_near_a_template_never_raise_and_decode_only_as_a_parse_would(
    prefix, garbage, cut
) -> None:
    plan = WirePlan(BATCHED, 1)
    data = perf_analyzers(2).SerializeToString()
    templates = learnt(plan, perf_analyzers(2))
    mangled = data[:prefix] + garbage + (b"" if cut else data[prefix + len(garbage) :])
    got = templates(mangled)
    if isinstance(got, Undecodable):
        return
    if isinstance(got, Matched):
        parsed = got.message()
        validated = got.validated(plan)
        assert validated is not None
        assert_same(validated, general(BATCHED, parsed))
    else:
        assert got == pb.ModelInferRequest.FromString(mangled)


def test_an_id_that_is_not_utf8_is_left_to_the_parse_to_refuse() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(1))
    data = perf_analyzers(1, request_id="ab").SerializeToString().replace(b"ab", b"\xff\xfe", 1)
    got = templates(data)
    assert isinstance(got, Undecodable) and "malformed request message" in got.reason


def test_a_request_over_a_mebibyte_is_never_learnt() -> None:
    from salvo.wire import _MAX_LEARNT_BYTES

    config = BATCHED.model_copy(update={"max_batch_size": 1 << 16})
    plan = WirePlan(config, 1)
    rows = _MAX_LEARNT_BYTES // 44 + 1  # 44 bytes a row: three FP32 and four INT64
    big = common_request(config, rows)
    templates = RequestTemplates()
    message = templates(big.SerializeToString())
    validated = plan.decode(message)
    assert validated is not None
    templates.learn(message, validated, plan)  # not the last kept: nothing learnt
    assert not templates._templates
    assert not isinstance(templates(big.SerializeToString()), Matched)


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
    message = templates(request(b"\0\0\0\0"))
    assert message.SerializeToString() == request(b"\0\0\0\0")  # it does round-trip
    templates.learn(message, plan.decode(message), plan)
    later = templates(request(b"\0\0\0\x07"))
    assert not isinstance(later, Matched)
    assert plan.decode(later).inputs[0].tolist() == [0, 0, 0, 7]


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
        message = templates(data)
        templates.learn(message, plan.decode(message), plan)
    assert list(templates._refusals.values()) == [_MAX_REFUSALS]
    assert not templates._templates


def test_matched_requests_share_parameters_that_cannot_be_changed() -> None:
    plan = WirePlan(BATCHED, 1)
    templates = learnt(plan, perf_analyzers(1))
    first = matched(templates, perf_analyzers(1, seed=1)).validated(plan)
    second = matched(templates, perf_analyzers(1, seed=2)).validated(plan)
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
        message = templates(tagged(value))
        assert isinstance(message, pb.ModelInferRequest)
        templates.learn(message, plan.decode(message), plan)
    assert list(templates._refusals.values()) == [_MAX_REFUSALS]
    # The template kept is the last one learnt, and still answers its own kind.
    assert isinstance(templates(tagged(_MAX_REFUSALS)), Matched)
    assert not isinstance(templates(tagged(_MAX_REFUSALS + 1)), Matched)


def test_a_request_naming_its_id_twice_is_never_a_template() -> None:
    """The last id wins in a parse; a template of such bytes would answer with the first."""
    plan = WirePlan(BATCHED, 1)

    def twice(first: str) -> bytes:
        head = pb.ModelInferRequest(model_name=BATCHED.name, id=first).SerializeToString()
        rest = perf_analyzers(1, request_id="zz")
        rest.ClearField("model_name")
        return head + rest.SerializeToString()

    templates = RequestTemplates()
    message = templates(twice("aa"))
    assert message.id == "zz"
    templates.learn(message, plan.decode(message), plan)
    later = templates(twice("bb"))
    assert not isinstance(later, Matched)
    assert later.id == "zz"
