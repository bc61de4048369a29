"""Read side of the clinical records. Every queryset here starts from Patient.objects.visible_to(user)."""
from django.db.models import QuerySet

from .models import Lesion, LesionImage, Patient


def visible_patients(user) -> QuerySet[Patient]:
    return Patient.objects.visible_to(user).select_related("care_team")


def visible_lesions(user) -> QuerySet[Lesion]:
    return Lesion.objects.filter(patient__in=Patient.objects.visible_to(user)).select_related("patient")


def visible_images(user) -> QuerySet[LesionImage]:
    return LesionImage.objects.filter(
        lesion__patient__in=Patient.objects.visible_to(user)
    ).select_related("lesion__patient", "uploaded_by")
