from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Model analyses"

    def ready(self):
        from auditlog.registry import auditlog

        from . import receivers  # noqa: F401  (queues analyses when images are stored)
        from .models import ModelVersion

        # Which version scores new images, its threshold and its validation status are clinical
        # decisions: audited (activation through the services writes its own entry, see
        # inference.services.versions).
        auditlog.register(ModelVersion, include_fields=["name", "is_active", "threshold", "validated"])
        from . import workers  # noqa: F401  (worker leases: claims of dead workers handed back at start)
