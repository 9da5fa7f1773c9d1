"""The app of the fairness and reload suites of scripts/bench.

- `GET /slow` sleeps BENCH_SLOW_S seconds (default 0.1: a slow request holds its worker
  thread without using CPU), then answers like `/`.
- Anything else answers at once with the hello app's bytes (`Hello, world!`, 13 bytes,
  `Content-Length` set), so the readiness probe of scripts/bench accepts it.
- Every answer says which worker process made it (`X-Pid`) and the `VALUE` environment
  variable of that worker (`X-Value`, "-" when unset): the reload suite changes `VALUE`
  in Baton's config and watches the new value appear.
"""
import os
import time

BODY = b"Hello, world!"
SLOW_S = float(os.environ.get("BENCH_SLOW_S", "0.1"))


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/slow":
        time.sleep(SLOW_S)
    start_response("200 OK", [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(BODY))),
        ("X-Pid", str(os.getpid())),
        ("X-Value", os.environ.get("VALUE", "-")),
    ])
    return [BODY]
