"""The grammar of an app's `module`: where its WSGI callable is found (pure).

    "pkg.mod:app"           the attribute `app` of module `pkg.mod`
    "pkg.mod:obj.attr"      an attribute of an attribute
    "pkg.mod:create_app()"  the result of calling a factory with no arguments

A lifecycle hook (`post_fork = "pkg.hooks:on_fork"`) is named the same way, without
the call: `parse_hook`.

Both sides of the spec are dotted Python identifiers: no empty part, no leading or
trailing dot, nothing around them (not even a newline). The config reader judges a
spec with `parse` when it reads the file, and the worker parses it again with the same
function to import it, so a spec the config accepts is one the worker can follow.
"""
from __future__ import annotations

from dataclasses import dataclass

FORMS = "'pkg.mod:callable' or 'pkg.mod:factory()'"
HOOK_FORMS = "'pkg.mod:function'"
# An app's lifecycle hooks: each a key of [apps.NAME] and a field of AppConfig
# (called by supervisor.worker.hooks).
HOOKS = ("post_fork", "post_worker_init", "worker_exit", "pre_request", "post_request")


@dataclass(frozen=True)
class ModuleSpec:
    """A parsed spec: import `module`, follow `attributes` in turn, call it if `call`."""
    module: str
    attributes: tuple[str, ...]
    call: bool


def parse(text: str) -> ModuleSpec:
    """Parse one spec; raise ValueError saying which part is wrong."""
    module, colon, target = text.partition(":")
    if not colon:
        raise ValueError(f"expected {FORMS}, found {text!r}: no ':' between module and callable")
    call = target.endswith("()")
    if call:
        target = target[:-2]
    if not _dotted(module):
        raise ValueError(f"expected a dotted module name before ':', found {module!r}")
    if not _dotted(target):
        raise ValueError(f"expected a dotted attribute name after ':', found {target!r}")
    return ModuleSpec(module, tuple(target.split(".")), call)


def _dotted(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def parse_hook(text: str) -> ModuleSpec:
    """Parse a hook's spec: a function, never a factory call; raise ValueError."""
    spec = parse(text)
    if spec.call:
        raise ValueError(f"expected {HOOK_FORMS}, found {text!r}: a hook is called by the worker, not named by a call")
    return spec
