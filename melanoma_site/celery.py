"""The Celery application. Configuration comes from Django settings (CELERY_*)."""
import os

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "melanoma_site.settings")

app = Celery("melanoma_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Tasks that go to a queue of their own when the named setting is set (else the default queue).
QUEUE_SETTINGS = {"inference.tasks.analyze_image": "ANALYSIS_QUEUE"}


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery router (settings.CELERY_TASK_ROUTES): the model analyses go to ANALYSIS_QUEUE when
    it is set; everything else (re-scores, heatmaps, the sweeper) to the default queue. Read at
    every send, so a process's settings decide where its messages go."""
    from django.conf import settings

    setting = QUEUE_SETTINGS.get(name)
    queue = getattr(settings, setting, "") if setting else ""
    return {"queue": queue} if queue else None


@worker_init.connect(weak=False)
def _install_model_warmup(**kwargs):
    """Worker processes load and probe the model at start, not on the first upload (inference.warmup)."""
    from inference.warmup import install

    install()
