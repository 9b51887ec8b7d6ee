"""Everything `icpgate run` would refuse, checked without starting anything.

`icpgate config check` and `icpgate run` both call `check_config`, so the one refuses exactly what
the other would: the config's own keys (config/settings.py), the policy pack, the block page texts, what
the pack asks of the config (a TLS block page needs a certificate), and the key and token files.
It lives apart from config/settings.py because it reads feed and gate modules the hot path must not import.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..config.settings import Config, load_config
from ..config.tomlschema import ConfigError, Problem, locate
from ..feed.signing import KeyFileError, load_private_key, load_public_keys
from ..feed.tokens import TokenFileError, load_tokens, read_token
from ..gate.blockpage import BlockPages, Operator
from ..policy.pack import LoadedPack, load_pack


def check_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> list[Problem]:
    """Every problem in the config and the files it names; empty when `run` could start on it."""
    try:
        config = load_config(path, overrides)
    except ConfigError as error:
        return error.problems
    try:
        pack = load_pack(config.policy_pack)
        BlockPages(pack.block, Operator(config.provider.name, config.provider.contact))
    except ConfigError as error:
        return error.problems
    errors = _tls_page(config, pack) + _key_files(config)
    text = path.read_text(encoding="utf-8")
    return [Problem(str(path), key, locate(text, key), message) for key, message in errors]


def _tls_page(config: Config, pack: LoadedPack) -> list[tuple[str, str]]:
    gate = config.gate
    if pack.block.tls_action != "page":
        return []
    if gate.tls_ca_dir is not None:
        if gate.tls_ca_dir.exists() and not gate.tls_ca_dir.is_dir():
            return [("gate.tls_ca_dir", "%s is not a folder" % gate.tls_ca_dir)]
        return []
    if gate.tls_certificate is None or gate.tls_key is None:
        return [("gate.tls_certificate", 'the policy pack %s sets tls_action = "page", which needs'
                 " gate.tls_certificate and gate.tls_key, or gate.tls_ca_dir" % pack.source)]  # fmt: skip
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(gate.tls_certificate, gate.tls_key)
    except (OSError, ssl.SSLError) as error:
        return [("gate.tls_certificate", "cannot load %s with key %s: %s" % (gate.tls_certificate, gate.tls_key,
                                                                              error.strerror or error))]  # fmt: skip
    return []


def _key_files(config: Config) -> list[tuple[str, str]]:
    checks = [
        ("feed.public_keys", lambda: load_public_keys(config.feed.public_keys)),
        ("feed.token_file", lambda: config.feed.token_file and read_token(config.feed.token_file)),
        ("publish.signing_key", lambda: config.publish.signing_key and load_private_key(config.publish.signing_key)),
        ("publish.tokens_file", lambda: config.publish.tokens_file and load_tokens(config.publish.tokens_file)),
    ]
    errors = []
    for key, check in checks:
        try:
            check()
        except (KeyFileError, TokenFileError) as error:
            errors.append((key, str(error)))
    return errors
