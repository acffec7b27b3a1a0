"""The time-series schemas (JSON Schema inputs, Arrow columns, dead-letter reasons) against the code."""

import json
from pathlib import Path

import orjson
import pytest
from jsonschema import Draft202012Validator

from embedstream.modalities.timeseries import (
    OBSERVATION_KEYS,
    WINDOW_KEYS,
    Observation,
    TimeSeriesWindow,
    parse_timeseries,
)
from embedstream.records import REASONS, BadRecord, SourceMessage
from embedstream.sinks.arrow_codec import output_schema

from .test_contracts import expected_fields

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
T, C = 4, 3
W = [[0.5, 1, -2]] * T


def validator(name):
    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


OBS = {
    "valid_minimal": ({"series_id": "s", "timestamp_ms": 0, "values": [1, 2.5, -3]}, True),
    "valid_metadata": ({"series_id": "s", "timestamp_ms": 2**63 - 1, "values": [1, 2, 3], "metadata": {}}, True),
    "missing_series": ({"timestamp_ms": 1, "values": [1, 2, 3]}, False),
    "empty_series": ({"series_id": "", "timestamp_ms": 1, "values": [1, 2, 3]}, False),
    "missing_time": ({"series_id": "s", "values": [1, 2, 3]}, False),
    "negative_time": ({"series_id": "s", "timestamp_ms": -1, "values": [1, 2, 3]}, False),
    "time_beyond_int64": ({"series_id": "s", "timestamp_ms": 2**63, "values": [1, 2, 3]}, False),
    "string_value": ({"series_id": "s", "timestamp_ms": 1, "values": [1, "2", 3]}, False),
    "bool_value": ({"series_id": "s", "timestamp_ms": 1, "values": [1, True, 3]}, False),
    "null_value": ({"series_id": "s", "timestamp_ms": 1, "values": [1, None, 3]}, False),
    "empty_values": ({"series_id": "s", "timestamp_ms": 1, "values": []}, False),
    "extra_field": ({"series_id": "s", "timestamp_ms": 1, "values": [1, 2, 3], "x": 1}, False),
    "metadata_list": ({"series_id": "s", "timestamp_ms": 1, "values": [1, 2, 3], "metadata": []}, False),
}
WINDOWS = {
    "valid_minimal": ({"series_id": "s", "values": W}, True),
    "valid_full": ({"series_id": "s", "values": W, "start_ms": 1, "end_ms": 2, "metadata": {"a": 1}}, True),
    "missing_series": ({"values": W}, False),
    "row_not_numbers": ({"series_id": "s", "values": [[1, 2, "x"]] * T}, False),
    "null_in_row": ({"series_id": "s", "values": [[1, 2, None]] * T}, False),
    "empty_row": ({"series_id": "s", "values": [[]] * T}, False),
    "timestamp_field": ({"series_id": "s", "values": W, "timestamp_ms": 1}, False),
    "negative_start": ({"series_id": "s", "values": W, "start_ms": -1}, False),
}


def test_schemas_are_valid_and_list_the_fields_the_parser_allows():
    obs, win = validator("timeseries-observation.schema.json"), validator("timeseries-window.schema.json")
    assert set(obs.schema["properties"]) == OBSERVATION_KEYS and obs.schema["additionalProperties"] is False
    assert set(win.schema["properties"]) == WINDOW_KEYS and win.schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("schema", "case"),
    [("timeseries-observation.schema.json", k) for k in OBS] + [("timeseries-window.schema.json", k) for k in WINDOWS],
)
def test_schema_agrees_with_the_parser(schema, case):
    doc, accepted = (OBS if "observation" in schema else WINDOWS)[case]
    out = parse_timeseries(SourceMessage("t", 0, 0, None, orjson.dumps(doc), 5), T, C, 1 << 20)
    assert validator(schema).is_valid(doc) is accepted
    if accepted:
        assert isinstance(out, Observation if "observation" in schema else TimeSeriesWindow), out
    else:
        assert isinstance(out, BadRecord)


@pytest.mark.parametrize("dim", [4, 16])
def test_arrow_columns_match_the_contract(dim):
    contract = json.loads((SCHEMAS / "embedding.arrow.json").read_text())
    schema = output_schema("timeseries", "m", "1", dim)
    assert [(f.name, str(f.type), f.nullable) for f in schema] == expected_fields(contract, "timeseries", dim)


def test_time_series_reasons_are_published():
    contract = json.loads((SCHEMAS / "dead-letter.json").read_text())
    published = {r["reason"] for r in contract["reasons"]}
    assert {"invalid_timeseries", "non_finite", "wrong_shape", "late", "evicted"} <= published <= set(REASONS)
