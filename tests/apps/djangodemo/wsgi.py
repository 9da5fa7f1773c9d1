"""The WSGI entry point, as `django-admin startproject` writes it: `djangodemo.wsgi`
alone means `djangodemo.wsgi:application`."""
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangodemo.settings")

application = get_wsgi_application()
