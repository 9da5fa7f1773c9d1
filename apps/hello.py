"""The smallest useful app: plain text, fixed length."""

BODY = b"Hello from Baton!\n"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
