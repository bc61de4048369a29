from django.apps import AppConfig


class PatientsConfig(AppConfig):
    name = "patients"
    verbose_name = "Clinical records"

    def ready(self):
        from auditlog.registry import auditlog

        from . import models

        auditlog.register(models.CareTeam, m2m_fields={"members"})
        auditlog.register(models.Patient)
        auditlog.register(models.Lesion)
        auditlog.register(models.LesionImage, exclude_fields=["file", "thumbnail"])
        auditlog.register(models.LesionReview)
