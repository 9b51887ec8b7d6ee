"""Public Suffix List, offline (publicsuffixlist ships its own copy).

Only the ICANN section is used: MIIT filings cover domains registered at a registrar, and the
private section (e.g. a cloud's customer zone) would split a provider's own filed domain into
pieces it does not file separately.
"""

from __future__ import annotations

from functools import lru_cache

from publicsuffixlist import PublicSuffixList


@lru_cache(maxsize=1)
def _list() -> PublicSuffixList:
    return PublicSuffixList(only_icann=True)


def is_public_suffix(name: str) -> bool:
    """True for `cn`, `com.cn`, `gov.cn`: a filing here would cover every domain below it."""
    return bool(_list().is_public(name))


def registrable_domain(name: str) -> str | None:
    """The registrable domain (主域名) of a normalised name, or None for a public suffix."""
    return _list().privatesuffix(name)
