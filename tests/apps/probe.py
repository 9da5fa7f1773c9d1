"""Reports who and where the worker is, so tests can check the process from outside."""
import json
import os
import time
from urllib.parse import parse_qs
from wsgiref.validate import validator


def _app(environ, start_response):
    query = parse_qs(environ["QUERY_STRING"])
    if "mark" in query:  # lets a test see that the request is running
        open(query["mark"][0], "w").close()
    if "sleep" in query:
        time.sleep(float(query["sleep"][0]))
    if "crash" in query:
        os._exit(7)
    body = json.dumps({
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "cwd": os.getcwd(),
        "umask": _umask(),
        "env": os.environ.get("PROBE_VALUE"),
        "path": environ["PATH_INFO"],
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


app = validator(_app)


def create_app():
    return app

# gunicorn's default name: `baton serve tests.apps.probe` means tests.apps.probe:application.
application = app
