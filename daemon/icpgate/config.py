"""The daemon config (config.example.toml documents every key).

Unknown keys are errors, relative paths resolve from the config file's folder, and `--set`
overrides apply before checking, so an override is checked like the file itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .policy_pack import load_pack
from .tomlschema import ConfigError, Field, Problem, apply_override, problems_for, read_toml, validate


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


CONFIG_SPEC = {
    "provider": {
        "id": Field((str,), check=_non_empty),
        "name": Field((str,), ""),
        "contact": Field((str,), ""),
    },
    "registry": {"path": Field((str,), check=_non_empty)},
    "policy": {"pack": Field((str,), "policies/default.toml", _non_empty)},
}


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    id: str
    name: str
    contact: str


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    provider: ProviderConfig
    registry_path: Path
    policy_pack: Path


def load_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and check a config file; raise ConfigError listing every problem."""
    data, text = read_toml(path)
    for assignment in overrides:
        apply_override(data, assignment)
    values, errors = validate(data, CONFIG_SPEC)
    if errors:
        raise ConfigError(problems_for(path, text, errors))
    base = path.resolve().parent
    return Config(
        source=path,
        provider=ProviderConfig(**values["provider"]),
        registry_path=_resolve(base, values["registry"]["path"]),
        policy_pack=_resolve(base, values["policy"]["pack"]),
    )


def _resolve(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def check_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> list[Problem]:
    """Every problem in the config and the policy pack it names; empty when both are good."""
    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        return error.problems
    try:
        load_pack(config.policy_pack)
    except ConfigError as error:
        return error.problems
    return []
