"""Settings for the demo project: no database, no apps, no middleware, so that
what Baton hands Django (the environ, wsgi.input, wsgi.file_wrapper) is all that
is tested."""
SECRET_KEY = "baton-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "djangodemo.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict = {}
USE_TZ = True
# Uploads past this size go to a temporary file, as a real project's large uploads do.
FILE_UPLOAD_MAX_MEMORY_SIZE = 1 << 20
DATA_UPLOAD_MAX_MEMORY_SIZE = 1 << 20
LOGGING_CONFIG = None
