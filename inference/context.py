"""Patient-level context re-scoring. PLACEHOLDER: the patient-context work replaces this module."""
from django.db import transaction

from .models import Analysis


def rescore_patient(*, patient_id: int, model_version_id: int) -> int:
    """Recompute the final score of every done analysis of this patient for this model version."""
    with transaction.atomic():
        rows = Analysis.objects.select_for_update().filter(
            image__lesion__patient_id=patient_id, model_version_id=model_version_id, status=Analysis.Status.DONE
        )
        n = 0
        for a in rows:
            a.final_score, a.final_score_source = a.probability, "image"
            a.save(update_fields=["final_score", "final_score_source"])
            n += 1
    return n
