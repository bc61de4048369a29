from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Model analyses"

    def ready(self):
        from . import receivers  # noqa: F401  (queues analyses when images are stored)
