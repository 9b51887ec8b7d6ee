"""Which HTTP engine reads plain HTTP: the compiled one (`_engine.pyx`) when it is built, else the
pure-Python reference alone (inspector.py, responses.py), which also reads whatever the compiled
engine passes on. `ICPGATE_HTTP_ENGINE=python` asks for the reference, to compare the two."""

from __future__ import annotations

import os
from types import ModuleType


def _load() -> tuple[ModuleType | None, str, str]:
    """The compiled module, the engine's name, and why it is not the compiled one."""
    if os.environ.get("ICPGATE_HTTP_ENGINE", "compiled") == "python":
        return None, "python", "ICPGATE_HTTP_ENGINE=python"
    try:
        from . import _engine
    except ImportError as error:
        return None, "python", "the compiled engine is not built (%s)" % error
    return _engine, "compiled", ""


compiled, ENGINE, ENGINE_NOTE = _load()
