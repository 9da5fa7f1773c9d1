"""WSGI apps that the integration tests serve through real Baton masters."""
