"""``embedstream config check FILE``: the effective settings (file + environment), secrets masked."""

from __future__ import annotations

import json
from typing import Any

from pydantic import SecretStr

from embedstream.config import Settings

MASK = "********"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    # JSON strings, numbers and arrays of them are valid TOML.
    return json.dumps(value)


def _lines(model: Any, data: dict[str, Any]) -> list[str]:
    lines = []
    for key, item in data.items():
        raw = getattr(model, key)
        if isinstance(raw, SecretStr):
            # A fixed mask, not the length or a prefix: nothing about the secret reaches a terminal or a log.
            lines.append(f"{key} = {_value(MASK)}  # secret, masked")
        elif item is None:
            lines.append(f"# {key} is unset")
        else:
            lines.append(f"{key} = {_value(item)}")
    return lines


def render_masked(settings: Settings) -> str:
    """Settings as TOML (loadable again, but for the masked secrets), unset keys as comments."""
    data = settings.model_dump(mode="json")
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    out = _lines(settings, top)
    for section, values in data.items():
        if isinstance(values, dict):
            out.append(f"\n[{section}]")
            out.extend(_lines(getattr(settings, section), values))
    return "\n".join(out) + "\n"
