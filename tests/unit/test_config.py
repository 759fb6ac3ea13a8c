"""Model config parsing: every error names the file and the field."""

from __future__ import annotations

import pytest

from salvo.domain.config import ConfigError, VersionPolicy, load_config, valid_model_name

GOOD = """max_batch_size: 8
inputs: [{name: x, datatype: FP32, dims: [4]}]
outputs: [{name: y, datatype: FP32, dims: [-1]}]
"""


def write(tmp_path, text, name="m", file="config.yaml"):
    model_dir = tmp_path / name
    model_dir.mkdir()
    (model_dir / file).write_text(text)
    return model_dir


def test_good_config_parses(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.name == "m" and config.max_batch_size == 8
    assert config.inputs[0].dims == (4,) and config.outputs[0].dims == (-1,)
    assert config.device == "auto" and config.instance_count == 1


def test_json_config_parses(tmp_path):
    text = '{"inputs": [{"name": "x", "datatype": "INT64", "dims": [2]}],'
    text += ' "outputs": [{"name": "y", "datatype": "BOOL", "dims": [1]}]}'
    config = load_config(write(tmp_path, text, file="config.json"))
    assert config.max_batch_size == 0 and config.inputs[0].datatype == "INT64"


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (GOOD.replace("FP32, dims: [4]", "FP33, dims: [4]"), "inputs.0.datatype", "FP33"),
        (GOOD.replace("[4]", "[0]"), "inputs.0.dims", "positive or -1"),
        (GOOD.replace("max_batch_size: 8", "max_batch_size: -1"), "max_batch_size", "0"),
        (GOOD + "device: tpu\n", "device", "tpu"),
        (GOOD + "instance_count: 0\n", "instance_count", "1"),
        (GOOD + "colour: red\n", "colour", "Extra inputs"),
        (
            GOOD + "dynamic_batching: {max_queue_delay_us: -5}\n",
            "dynamic_batching.max_queue_delay_us",
            "0",
        ),
        (
            GOOD + "dynamic_batching: {hold_for_returns: forever}\n",
            "dynamic_batching.hold_for_returns",
            "until_quiet",
        ),
        (
            GOOD.replace("inputs: [{name: x, datatype: FP32, dims: [4]}]", "inputs: []"),
            "inputs",
            None,
        ),
        ("- just\n- a list\n", None, "mapping"),
        (
            GOOD.replace("[4]", "[-1]") + "optimization: {cuda_graphs: true}\n",
            None,
            "optimization.cuda_graphs needs fixed input dims: input 'x' has dims [-1]",
        ),
    ],
)
def test_errors_name_file_and_field(tmp_path, text, field, words):
    model_dir = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(model_dir)
    message = str(info.value)
    assert str(model_dir / "config.yaml") in message
    if field:
        assert f"field '{field}'" in message
    if words:
        assert words in message


def test_duplicate_names_are_refused(tmp_path):
    text = GOOD.replace(
        "inputs: [{name: x, datatype: FP32, dims: [4]}]",
        "inputs: [{name: x, datatype: FP32, dims: [4]}, {name: x, datatype: FP32, dims: [4]}]",
    )
    with pytest.raises(ConfigError, match="duplicate inputs name"):
        load_config(write(tmp_path, text))


def test_name_must_match_directory(tmp_path):
    with pytest.raises(ConfigError, match="field 'name'.*does not match the directory"):
        load_config(write(tmp_path, "name: other\n" + GOOD))


def test_unparseable_and_missing(tmp_path):
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(write(tmp_path, "inputs: [", name="a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "empty")


def test_version_policy():
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy(latest=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy(all=True).select([3, 1]) == [1, 3]
    assert VersionPolicy(specific=(1, 5)).select([1, 2]) == [1]


@pytest.mark.parametrize("name", ["mlp", "resnet-50", "a.b_c", "v2"])
def test_valid_model_names(name):
    assert valid_model_name(name)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/etc", "a\\b", "..x", "-x"])
def test_invalid_model_names(name):
    assert not valid_model_name(name)
