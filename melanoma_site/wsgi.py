import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "melanoma_site.settings")
application = get_wsgi_application()

# Before the first request, not on it: under gunicorn (preload_app) the master does this once and
# every worker, recycled ones too, starts warm (melanoma_site/warm.py).
if settings.WEB_WARM:
    from melanoma_site.warm import warm_web

    warm_web()
