"""Searches its own worker's memory the way hostile app code can, and says what it found.

`/` walks `gc.get_objects()` for any str or bytes holding a secret (a string that
contains `MARKER` and is longer than it: the literal below is exactly `MARKER`), and for
any object of the master's config or process types; it answers with what it found, as
JSON. The secrets are in the apps' `env`, set by the test."""
import gc
import json
import os
import sys

MARKER = "h4-secret-"
MASTER_TYPES = {"AppConfig", "Config", "MasterConfig", "ListenerConfig", "Master", "WorkerPool", "Supervisor"}


def _search():
    secrets, objects = set(), set()
    marker_b = MARKER.encode()

    def look(item):
        kind = type(item)
        if kind is str and MARKER in item and item != MARKER:
            secrets.add(item)
        elif kind is bytes and marker_b in item and item != marker_b:
            secrets.add(item.decode(errors="replace"))

    # Strings are not tracked by the collector, and neither are dicts and tuples that
    # hold only atoms: look at every referent of every tracked object, one level into
    # the untracked containers.
    for obj in gc.get_objects():
        kind = type(obj)
        if kind.__name__ in MASTER_TYPES:
            objects.add(f"{kind.__module__}.{kind.__name__}")
        for ref in gc.get_referents(obj):
            look(ref)
            if type(ref) in (dict, tuple) and not gc.is_tracked(ref):
                for item in (*ref.keys(), *ref.values()) if type(ref) is dict else ref:
                    look(item)
    return secrets, objects


def app(environ, start_response):
    secrets, objects = _search()
    body = json.dumps({
        "pid": os.getpid(),
        "secrets": sorted(secrets),
        "objects": sorted(objects),
        "master_modules": sorted(name for name in sys.modules if name.startswith("supervisor.master")),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
