"""Settings: every problem is reported by key, before any stage runs; random input never crashes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from components.core.config import Params, ParamsError, load_params, parse_params
from components.core.overrides import overrides_from_strings, write_overrides

REPO = Path(__file__).resolve().parents[2]


def test_shipped_params_file_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # Every section and every key of each section is spelled out in params.yaml (knobs documented next to defaults).
    assert set(raw) == set(Params.model_fields)
    for section, model in Params.model_fields.items():
        assert set(raw[section]) == set(model.annotation.model_fields), section
    assert params.model.backbone == "mobilenet_v2"


def test_mistyped_key_is_named_with_a_suggestion():
    with pytest.raises(ParamsError, match=r"unknown key 'finetune.epoch'; did you mean 'finetune.epochs'"):
        parse_params({"finetune": {"epoch": 3}})


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match=r"unknown key 'trainhead'; did you mean 'train_head'"):
        parse_params({"trainhead": {}})


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train_head": {"learning_rate": 0}}, "train_head.learning_rate"),
        ({"finetune": {"learning_rate": -1e-5}}, "finetune.learning_rate"),
        ({"ingest": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}}, "ingest.split"),
        ({"model": {"image_size": "big"}}, "model.image_size"),
        ({"validate": {"policy": "ignore"}}, "validate.policy"),
    ],
)
def test_bad_value_message_names_key_and_value(raw, key):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert f"'{key}'" in str(err.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ParamsError) as err:
        parse_params({"finetune": {"epoch": 3}, "train_head": {"dropout": 2}})
    assert "finetune.epoch" in str(err.value) and "train_head.dropout" in str(err.value)


def test_credentials_in_tracking_uri_are_refused():
    with pytest.raises(ParamsError, match="tracking.uri"):
        parse_params({"tracking": {"uri": "http://user:secret@mlflow.example:5000"}})


SECRET = "hunter2"
CREDENTIAL_SETTINGS = [
    # (section, key, value, words the message must hold: what it is, and where the credential goes instead)
    ("tracking", "uri", f"https://{SECRET}@mlflow.example.com", ("user name or password", "MLFLOW_TRACKING_TOKEN")),
    ("tracking", "uri", f"https://mlflow.example.com/?token={SECRET}", ("token", "MLFLOW_TRACKING_TOKEN")),
    ("tracking", "uri", f"http://user:{SECRET}@mlflow.example:5000", ("user name or password", "MLFLOW_TRACKING_")),
    ("ingest", "allowed_roots", ["/data", f"s3://AKIA:{SECRET}@bucket/set/"], ("user name or password", "AWS_")),
    ("ingest", "allowed_roots", [f"https://cdn.example.com/set/?X-Amz-Signature={SECRET}"], ("X-Amz-Signature",)),
    ("ingest", "source", f"https://alice:{SECRET}@example.com/d.tgz", ("user name or password", "AWS_")),
    ("model", "weights", f"https://example.com/w.weights.h5?sig={SECRET}", ("sig",)),  # any setting, not a list
]


@pytest.mark.parametrize("section, key, value, words", CREDENTIAL_SETTINGS)
def test_one_credential_rule_for_every_setting_that_holds_a_url(section, key, value, words):
    with pytest.raises(ParamsError) as err:
        parse_params({section: {key: value}})
    message = str(err.value)
    assert f"'{section}.{key}'" in message and SECRET not in message
    assert all(word in message for word in words), message


def test_a_credential_in_an_override_is_refused_before_the_file_is_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_bytes()
    for override in (f"ingest.allowed_roots=['s3://k:{SECRET}@b/p/']", f"tracking.uri=https://{SECRET}@m.example"):
        with pytest.raises(ParamsError) as err:
            write_overrides(path, [override])
        assert SECRET not in str(err.value)
    assert path.read_bytes() == before


def test_urls_without_credentials_are_still_accepted():
    params = parse_params(
        {
            "tracking": {"uri": "https://mlflow.example.com:8443/base"},
            "ingest": {"allowed_roots": ["/data", "s3://bucket/set/", "https://cdn.example.com/a/?v=2"]},
        }
    )
    assert params.ingest.allowed_roots[2] == "https://cdn.example.com/a/?v=2"


def test_override_is_validated_before_the_file_is_written(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_bytes()
    with pytest.raises(ParamsError, match="finetune.epochz"):
        write_overrides(path, ["finetune.epochz=3"])
    assert path.read_bytes() == before


def test_an_override_inside_a_key_set_to_a_value_is_a_settings_error():
    with pytest.raises(ParamsError, match="'finetune' is not a section"):
        overrides_from_strings(["finetune=1", "finetune.epochs=2"])
    assert overrides_from_strings(["finetune.epochs=2"]).finetune.epochs == 2


def test_override_keeps_comments_and_sets_value(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    write_overrides(path, ["finetune.epochs=3", "ingest.source=/data/my images"])
    text = path.read_text()
    assert "# Every knob of the pipeline" in text
    params = load_params(path)
    assert params.finetune.epochs == 3 and params.ingest.source == "/data/my images"


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(yaml_values)
def test_random_settings_are_accepted_or_rejected_with_a_message(raw):
    try:
        parse_params(raw)
    except ParamsError as err:
        assert str(err)


section_names = st.sampled_from(sorted(Params.model_fields))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(section_names, st.dictionaries(st.text(max_size=15), yaml_values, max_size=3), max_size=4))
def test_random_section_contents_never_crash(raw):
    try:
        parse_params(raw)
    except ParamsError as err:
        assert str(err)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_yaml_text_never_crashes_the_loader(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_params(path)
    except ParamsError as err:
        assert str(err)


def test_params_yaml_states_exactly_the_model_defaults():
    # One default per setting: deleting a key from params.yaml must not change the run.
    shipped = load_params(REPO / "params.yaml").model_dump()
    defaults = Params().model_dump()
    differing = {
        f"{section}.{key}": (shipped[section][key], defaults[section][key])
        for section in defaults
        for key in defaults[section]
        if shipped[section][key] != defaults[section][key]
    }
    assert not differing, f"params.yaml vs components/core/config.py defaults (yaml, code): {differing}"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"finetune": {"epochs": True}}, "finetune.epochs"),
        ({"train_head": {"learning_rate": False}}, "train_head.learning_rate"),
        ({"validate": {"max_pixels": 1e15}}, "validate.max_pixels"),
    ],
)
def test_booleans_and_absurd_limits_are_refused_by_key(raw, key):
    with pytest.raises(ParamsError, match=rf"'{key}'"):
        parse_params(raw)


def test_min_size_above_max_size_is_refused():
    with pytest.raises(ParamsError, match=r"min_width \(500\) is larger than max_width \(400\)"):
        parse_params({"validate": {"min_width": 500, "max_width": 400}})


def test_booleans_stay_valid_where_a_boolean_is_expected():
    assert parse_params({"train_head": {"cached_features": False}}).train_head.cached_features is False
    assert parse_params({"ingest": {"allow_http": True}}).ingest.allow_http is True


def test_unquoted_on_and_off_mean_the_words_where_a_field_takes_them():
    params = parse_params(
        yaml.safe_load(
            "validate:\n  near_duplicates:\n    policy: off\ntrain_head:\n  label_issues:\n    action: off\n"
        )
    )
    assert params.validate.near_duplicates.policy == "off" and params.train_head.label_issues.action == "off"
    both = (
        parse_params(yaml.safe_load("finetune:\n  flip_tta: on\n")),
        parse_params(yaml.safe_load("finetune:\n  flip_tta: off\n")),
    )
    assert [p.finetune.flip_tta for p in both] == ["on", "off"]  # YAML 1.1 reads on/off as booleans
    with pytest.raises(ParamsError, match="boolean"):
        parse_params(yaml.safe_load("finetune:\n  epochs: on\n"))
    with pytest.raises(ParamsError, match="near_duplicates.policy"):
        parse_params(yaml.safe_load("validate:\n  near_duplicates:\n    policy: on\n"))


def test_a_serving_decode_budget_must_hold_one_image_of_the_largest_size():
    with pytest.raises(ParamsError, match="max_request_pixels"):
        parse_params({"evaluate": {"serving": {"max_pixels": 30_000_000, "max_request_pixels": 20_000_000}}})
    serving = parse_params({}).evaluate.serving
    assert serving.max_pixels < parse_params({}).validate.max_pixels <= serving.max_request_pixels
