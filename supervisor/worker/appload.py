"""Find a WSGI callable from a spec: "pkg.mod:name", "pkg.mod:obj.attr" or "pkg.mod:factory()".

Runs in the worker only, after the privilege drop: the master never imports app code.
"""
from __future__ import annotations

import importlib
import re

_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)(?P<call>\(\))?$")


class AppLoadError(Exception):
    pass


def load(spec: str):
    match = _SPEC.match(spec)
    if not match:
        raise AppLoadError(f"{spec!r} is not MODULE:CALLABLE or MODULE:FACTORY()")
    target = importlib.import_module(match["module"])
    for part in match["attr"].split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppLoadError(f"module {match['module']!r} has no attribute {match['attr']!r}") from None
    if match["call"]:
        target = target()
    if not callable(target):
        raise AppLoadError(f"{spec!r} is not callable (got {type(target).__name__})")
    return target
