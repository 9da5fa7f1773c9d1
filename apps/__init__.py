"""Demo WSGI apps served by etc/baton.toml."""
