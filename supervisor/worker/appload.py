"""Find a WSGI callable from a spec: "pkg.mod:name", "pkg.mod:obj.attr" or "pkg.mod:factory()"
(and a lifecycle hook from "pkg.mod:function").

The grammar is `config.modulespec`, the one the config reader judged the spec by.
Runs in the worker only, after the privilege drop: the master never imports app code.
"""
from __future__ import annotations

import importlib

from supervisor.config import modulespec


class AppLoadError(Exception):
    pass


def load(text: str):
    try:
        spec = modulespec.parse(text)
    except ValueError:
        raise AppLoadError(f"{text!r} is not MODULE:CALLABLE or MODULE:FACTORY()") from None
    target = _follow(spec)
    if spec.call:
        target = target()
    if not callable(target):
        raise AppLoadError(f"{text!r} is not callable (got {type(target).__name__})")
    return target


def load_hook(text: str):
    """The function a hook's spec names ("pkg.mod:function"), imported."""
    try:
        spec = modulespec.parse_hook(text)
    except ValueError:
        raise AppLoadError(f"{text!r} is not MODULE:FUNCTION") from None
    target = _follow(spec)
    if not callable(target):
        raise AppLoadError(f"{text!r} is not callable (got {type(target).__name__})")
    return target


def _follow(spec: modulespec.ModuleSpec):
    """Import the spec's module and follow its attributes."""
    target = importlib.import_module(spec.module)
    for part in spec.attributes:
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppLoadError(f"module {spec.module!r} has no attribute {'.'.join(spec.attributes)!r}") from None
    return target
