# Baton regression: a header name with "_" never reaches the application.
request = {
    "method": "GET",
    "uri": uri("/u"),
    "version": (1, 1),
    "headers": [("HOST", "example.com"), ("X-REAL", "ok")],
    "body": b"",
}
