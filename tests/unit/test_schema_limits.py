"""Every limit the contracts in ``schemas/`` document as "SETTING ... (default VALUE)" is the setting's default.

The schema texts are read as a user reads them: a dotted setting name, a few words, then
``(default 10 MiB)``; the value is parsed (bytes with their unit, plain numbers, lists of names) and
compared with ``Settings()``. A documented default that drifts from the code fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from embedstream.config import Settings
from embedstream.consume.deadletter import MAX_MESSAGE_CHARS

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
UNITS = {"B": 1, "bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
# "limits.max_message_bytes (default 10 MiB)", "text.max_message_bytes long (default 1 MiB, else ...)":
# the setting, at most a few words without punctuation, then the parenthesised default.
DOCUMENTED = re.compile(r"\b([a-z_]+(?:\.[a-z_]+)+)[a-z ]{0,40}?\(default ([^,;)]+(?:, [A-Z]+)*)")
# Every limit a contract must document, so the scan above cannot pass by finding nothing.
REQUIRED = {
    "limits.max_message_bytes",
    "text.max_message_bytes",
    "timeseries.max_message_bytes",
    "limits.formats",
    "timeseries.max_id_bytes",
    "timeseries.max_header_bytes",
    "timeseries.max_state_bytes",
}


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def documented_defaults() -> list[tuple[str, str, str]]:
    """(schema file, dotted setting, documented default text) for every such mention in schemas/."""
    found = []
    for path in sorted(SCHEMAS.glob("*.json")):
        for text in _strings(json.loads(path.read_text())):
            found += [(path.name, m.group(1), m.group(2).strip()) for m in DOCUMENTED.finditer(text)]
    return found


def parse_default(text: str) -> Any:
    size = re.fullmatch(r"(\d[\d_,]*(?:\.\d+)?) ?(B|bytes|KiB|MiB|GiB)", text)
    if size:
        return int(float(size.group(1).replace(",", "").replace("_", "")) * UNITS[size.group(2)])
    if re.fullmatch(r"\d[\d_,]*", text):
        return int(text.replace(",", "").replace("_", ""))
    if text in {"unset", "none", "None"}:
        return None
    if re.fullmatch(r"[A-Z]+(, [A-Z]+)*", text):
        return tuple(text.split(", "))
    raise AssertionError(f"cannot read the documented default {text!r}")


def setting_default(dotted: str) -> Any:
    value: Any = Settings()
    for part in dotted.split("."):
        if not hasattr(value, part):
            raise AssertionError(f"schemas document a setting {dotted!r} that does not exist")
        value = getattr(value, part)
    return value


def test_the_scan_finds_every_limit_the_contracts_must_document():
    assert REQUIRED <= {setting for _, setting, _ in documented_defaults()}


@pytest.mark.parametrize(("schema", "setting", "text"), documented_defaults())
def test_each_documented_default_is_the_settings_default(schema, setting, text):
    documented, actual = parse_default(text), setting_default(setting)
    if isinstance(actual, tuple):
        actual = tuple(str(a).upper() for a in actual)
    assert documented == actual, f"{schema}: {setting} is documented as {text!r}, the default is {actual!r}"


def test_parse_default_reads_units_and_refuses_what_it_does_not_know():
    assert parse_default("10 MiB") == 10 * 1024 * 1024
    assert parse_default("64 KiB") == 65536
    assert parse_default("10000") == parse_default("10,000") == 10_000
    assert parse_default("JPEG, PNG, WEBP") == ("JPEG", "PNG", "WEBP")
    with pytest.raises(AssertionError):
        parse_default("ten megabytes")
    with pytest.raises(AssertionError):
        setting_default("limits.max_mesage_bytes")


def test_dead_letter_message_length_is_the_one_the_sink_truncates_to():
    doc = json.loads((SCHEMAS / "dead-letter.json").read_text())
    assert doc["max_message_chars"] == MAX_MESSAGE_CHARS
    (header,) = [h for h in doc["headers"] if h["name"] == "embedstream.dlq.message"]
    assert f"at most {MAX_MESSAGE_CHARS} characters" in header["value"]
