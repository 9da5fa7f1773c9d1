"""HTTP/1.1 in the worker: the sans-I/O protocol state (protocol), PEP 3333 (wsgi), PROXY
protocol headers, the access-log format, and the serving loop (server)."""
