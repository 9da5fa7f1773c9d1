"""Echo the request back as JSON: method, path, query, headers, body length."""

import json


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    headers = {key[5:].replace("_", "-").title(): value
               for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").title()] = environ[key]
    payload = json.dumps({
        "method": environ["REQUEST_METHOD"],
        "path": environ["PATH_INFO"],
        "query": environ["QUERY_STRING"],
        "headers": headers,
        "body_length": len(body),
        "remote_addr": environ.get("REMOTE_ADDR"),
        "scheme": environ["wsgi.url_scheme"],
    }, indent=2).encode() + b"\n"
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(payload)))])
    return [payload]
