"""Says who the app believes the client is: REMOTE_ADDR, REMOTE_PORT, the scheme, the Host."""
import json


def app(environ, start_response):
    body = json.dumps({
        "remote_addr": environ.get("REMOTE_ADDR"),
        "remote_port": environ.get("REMOTE_PORT"),
        "scheme": environ["wsgi.url_scheme"],
        "host": environ.get("HTTP_HOST"),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
