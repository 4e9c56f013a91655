"""Property-based tests of what users type: manifests, YAML recipes and ``key=value`` overrides.

Any input gives a result or the parser's own error (`ManifestError`, `ConfigFileError`), whose message
names the file, line or key; never a traceback from deep inside. Hypothesis tries the inputs (bytes
that are not UTF-8, JSON of every shape, YAML with non-string keys, overrides with odd syntax).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechlm.cli import main
from speechlm.configfile import ConfigFileError, apply_overrides, build_dataclass, read_yaml
from speechlm.finetune.config import TrainConfig
from speechlm.finetune.examples import MANIFEST_FIELDS, ManifestError, read_manifest

CASES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TINY_TRAIN_YAML = Path(__file__).parents[1] / "configs" / "tiny" / "train.yaml"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
field_names = st.sampled_from([*MANIFEST_FIELDS, "txt", "speaker"]) | st.text(max_size=6)
rows = st.dictionaries(field_names, json_values, max_size=6)
lines = st.one_of(rows.map(json.dumps), json_values.map(json.dumps), st.text(max_size=30),
                  st.binary(max_size=30).map(lambda raw: raw.decode("latin-1")))


@CASES
@given(st.lists(st.one_of(lines.map(str.encode), st.binary(max_size=40)), max_size=6))
def test_any_manifest_reads_or_names_its_problems(tmp_path, content):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b"\n".join(content))
    for allow_extra_fields in (False, True):
        try:
            examples = read_manifest(path, allow_extra_fields=allow_extra_fields)
        except ManifestError as error:
            assert str(error).startswith(str(path))
        else:
            assert examples and all(example.id for example in examples)


@CASES
@given(st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                 st.dictionaries(st.text(max_size=10) | st.integers(), json_values, max_size=5)
                 .map(lambda data: json.dumps(data).encode())))  # JSON is YAML
def test_any_recipe_file_builds_or_names_its_problems(tmp_path, content):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    try:
        build_dataclass(TrainConfig, read_yaml(path))
    except ConfigFileError as error:
        assert str(error)


override_keys = st.sampled_from(["model.mode", "data.tasks.asr", "training.max_steps", "training", "x.y.z", "",
                                 "data", "model.projector.reader", ".", "a..b"]) | st.text(max_size=12)
override_values = st.sampled_from(["1", "-1", "true", "null", "[a, b]", "{", "[", "'", "1e400", "lora", ":"]) \
    | st.text(max_size=12)


@CASES
@given(st.lists(st.tuples(override_keys, st.sampled_from(["=", "", "=="]), override_values)
                .map(lambda parts: "".join(parts)), max_size=4))
def test_any_overrides_apply_or_name_the_bad_one(overrides):
    try:
        build_dataclass(TrainConfig, apply_overrides(read_yaml(TINY_TRAIN_YAML), overrides))
    except ConfigFileError as error:
        assert str(error)


@pytest.mark.parametrize("override", ["training.max_steps=[", "data.tasks={", "model=1", "=3", "data.tasks.dance=1"])
def test_a_bad_override_is_a_one_line_error_from_the_cli(override, capsys):
    assert main(["train", str(TINY_TRAIN_YAML), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("speechlm train: error:") and "Traceback" not in err
