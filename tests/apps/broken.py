"""An app that cannot be imported."""
raise RuntimeError("broken on purpose: this app fails at import")
