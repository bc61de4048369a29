from django.apps import AppConfig


class PatientsConfig(AppConfig):
    name = "patients"
    verbose_name = "Clinical records"

    def ready(self):
        from auditlog.registry import auditlog
        from django.contrib.auth import get_user_model

        from . import models

        # Account changes that widen what someone sees (staff sees every patient) or who they are:
        # the audit trail records them, whoever makes them (admin, shell, command). Never the
        # password hash; not last_login (every login would be an entry).
        auditlog.register(get_user_model(), include_fields=[
            "username", "first_name", "last_name", "email", "is_active", "is_staff", "is_superuser",
        ], m2m_fields={"groups", "user_permissions"})

        auditlog.register(models.CareTeam, m2m_fields={"members"})
        auditlog.register(models.Patient)
        auditlog.register(models.Lesion)
        auditlog.register(models.LesionImage, exclude_fields=["file", "thumbnail"])
        auditlog.register(models.LesionReview)
