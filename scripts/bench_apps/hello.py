"""The hello-world app every server in scripts/bench serves: the same bytes, fixed length.

Kept minimal on purpose, so the benchmark measures the servers, not the app.
"""

BODY = b"Hello, world!"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    start_response("200 OK", HEADERS)
    return [BODY]
