"""HTTP/1.1 in the worker: the sans-I/O protocol state (protocol), a connection's state
table (connection), PEP 3333 (wsgi), PROXY protocol headers, the access-log format, the
app threads (pool), and the server on the worker's event loop (server)."""
