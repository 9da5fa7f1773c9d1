"""A minimal real Django project (no database), served by Baton as
`baton serve djangodemo.wsgi` from tests/apps: see views.py for what it answers."""
