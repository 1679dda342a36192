"""Detector configuration: defaults from the registered detectors, user overrides validated key by key.

Sections and keys follow what users already write (``gradient.explosion_threshold``,
``learning_rate.change_threshold`` ...). Unknown sections, unknown keys and values of the wrong type
are errors that name the key.

>>> cfg = build_config({"loss_spike": {"threshold": 5}})
>>> cfg["loss_spike"]["threshold"]
5.0
>>> build_config({"loss_spike": {"treshold": 5}})
Traceback (most recent call last):
...
detectors.config.ConfigError: loss_spike.treshold: unknown key (known: ...)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import DETECTORS

__all__ = ["ConfigError", "default_config", "build_config"]

#: section of switches that pick which registered detectors run
DETECTORS_SECTION = "detectors"


class ConfigError(ValueError):
    """A configuration value that cannot be used; ``key`` is its dotted name."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def default_config() -> dict[str, dict[str, Any]]:
    """Every section with every key at its default, from the registered detectors."""
    cfg: dict[str, dict[str, Any]] = {DETECTORS_SECTION: {"disabled": []}}
    for cls in DETECTORS.values():
        section = cfg.setdefault(cls.section, {})
        for key, value in cls.defaults.items():
            section.setdefault(key, value)
    return cfg


def _coerce(key: str, default: Any, value: Any) -> Any:
    number = _coerce_value(key, default, value)
    if isinstance(number, (int, float)) and not isinstance(number, bool):
        # every detector setting is a threshold, a factor, a count or a window: finite and not negative,
        # and a window holds at least one step
        if not math.isfinite(number) or number < 0:
            raise ConfigError(key, f"expected a finite number >= 0, got {value!r}")
        name = key.rsplit(".", 1)[-1]
        if number < 1 and isinstance(number, int) and ("window" in name or name in ("span", "baseline")):
            raise ConfigError(key, f"expected at least 1, got {value!r}")
    if isinstance(number, list) and not all(isinstance(item, str) for item in number):
        raise ConfigError(key, f"expected a list of names, got {value!r}")
    return number


def _coerce_value(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {value!r}")
    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(key, f"expected a list, got {value!r}")
    return value


def build_config(overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Defaults merged with ``overrides`` (a parsed TOML document or keyword sections)."""
    cfg = default_config()
    for section, values in (overrides or {}).items():
        if section not in cfg:
            raise ConfigError(section, f"unknown section (known: {', '.join(sorted(cfg))})")
        if not isinstance(values, Mapping):
            raise ConfigError(section, f"expected a table of settings, got {values!r}")
        for key, value in values.items():
            if key not in cfg[section]:
                known = ", ".join(sorted(cfg[section]))
                raise ConfigError(f"{section}.{key}", f"unknown key (known: {known})")
            cfg[section][key] = _coerce(f"{section}.{key}", cfg[section][key], value)
    unknown = set(cfg[DETECTORS_SECTION]["disabled"]) - set(DETECTORS)
    if unknown:
        raise ConfigError(f"{DETECTORS_SECTION}.disabled",
                          f"unknown detector(s) {sorted(unknown)} (known: {', '.join(sorted(DETECTORS))})")
    return cfg
