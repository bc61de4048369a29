"""Read side of the clinical records. Every queryset here starts from Patient.objects.visible_to(user)."""
from django.db.models import QuerySet

from .models import Lesion, LesionImage, LesionReview, Patient


def visible_patients(user) -> QuerySet[Patient]:
    return Patient.objects.visible_to(user).select_related("care_team")


def visible_lesions(user) -> QuerySet[Lesion]:
    return Lesion.objects.filter(patient__in=Patient.objects.visible_to(user)).select_related("patient")


def visible_images(user) -> QuerySet[LesionImage]:
    return LesionImage.objects.filter(
        lesion__patient__in=Patient.objects.visible_to(user)
    ).select_related("lesion__patient", "uploaded_by")


def review_queue(user) -> list:
    """The user's "To review" list: lesions of visible patients with a result newer than their
    latest review (or never reviewed); flagged first, then by score (highest first).

    Each item is the lesion with ``result`` (its current result, naming the model version) and
    ``last_review`` (the review in force, or None) attached.
    """
    from django.db.models import Max

    from .results import is_unreviewed, lesion_results

    lesions = list(visible_lesions(user).filter(images__isnull=False).distinct()
                   .annotate(last_reviewed_at=Max("reviews__created_at")))
    results = lesion_results(lesion.pk for lesion in lesions)
    items = []
    for lesion in lesions:
        result = results.get(lesion.pk)
        if is_unreviewed(result, lesion.last_reviewed_at):
            lesion.result = result
            items.append(lesion)
    current = {r.lesion_id: r for r in LesionReview.objects.current().filter(
        lesion_id__in=[l.pk for l in items]).select_related("reviewed_by")}
    for lesion in items:
        lesion.last_review = current.get(lesion.pk)
    items.sort(key=lambda l: (not l.result.flagged, -l.result.score, l.patient.name.lower(), l.pk))
    return items


def follow_ups_due(user, *, within_days: int = 30, today=None) -> QuerySet[LesionReview]:
    """Reviews in force (not superseded) of visible patients whose follow-up is due on or before
    ``today + within_days``, soonest (most overdue) first."""
    import datetime

    from django.utils import timezone

    today = today or timezone.localdate()
    return (LesionReview.objects.current()
            .filter(lesion__patient__in=Patient.objects.visible_to(user), follow_up_due__isnull=False,
                    follow_up_due__lte=today + datetime.timedelta(days=within_days))
            .select_related("lesion__patient", "reviewed_by").order_by("follow_up_due", "id"))


def visible_reviews(user) -> QuerySet[LesionReview]:
    return LesionReview.objects.filter(lesion__patient__in=Patient.objects.visible_to(user)).select_related(
        "lesion__patient", "reviewed_by", "superseded_by")
