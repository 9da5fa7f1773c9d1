"""Baton: a prefork WSGI server that hands sockets from process to process."""

__version__ = "0.1.0"
