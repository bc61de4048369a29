"""Inference business logic (keyword-only services). No torch here."""
from .models import Analysis, ModelVersion


def active_model_version() -> ModelVersion | None:
    return ModelVersion.objects.filter(is_active=True).first()


def queue_analyses(*, images) -> list[Analysis]:
    """PLACEHOLDER (the analysis pipeline replaces it): create queued analyses for the active model."""
    return []
