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
    out: list[str] = []
    _section(settings, settings.model_dump(mode="json"), [], out)
    return "\n".join(out).lstrip("\n") + "\n"


def _section(model: Any, data: dict[str, Any], path: list[str], out: list[str]) -> None:
    """One section's keys, then its nested sections as ``[a.b]`` tables (``[input.registry]``)."""
    if path:
        out.append(f"\n[{'.'.join(path)}]")
    out.extend(_lines(model, {k: v for k, v in data.items() if not isinstance(v, dict)}))
    for key, values in data.items():
        if isinstance(values, dict):
            _section(getattr(model, key), values, [*path, key], out)
