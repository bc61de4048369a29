"""Page selectors of inference results: bounded queries (one prefetch for all images of a page)."""
from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from patients.selectors import visible_images

from .models import Analysis, ModelVersion
from .scoring import active_version as active_model_version


def visible_analyses(user) -> QuerySet[Analysis]:
    """Analyses of the images the user may see (the one visibility rule, through
    ``patients.selectors.visible_images``); the embedding stays deferred."""
    return Analysis.objects.filter(image__in=visible_images(user).values("pk")).defer("embedding")

ACTIVE_ATTR = "active_analyses"


def analysis_prefetch(model_version: ModelVersion | None = None, *, prefix: str = "") -> Prefetch:
    """``Prefetch`` of each image's analysis for the active version into ``image.active_analyses``.

    Use on a LesionImage queryset (``prefix=""``) or through a relation, e.g.
    ``Lesion.objects.prefetch_related(analysis_prefetch(prefix="images__"))``. One query for all
    images, so ``{% include "inference/_image_result.html" %}`` costs no query per image.
    """
    version = model_version if model_version is not None else active_model_version()
    # The version is not joined (a join would decode its JSON card, metrics and context model again
    # for every image): ``{% image_result %}`` gives each row the one version object of the request.
    qs = Analysis.objects.none() if version is None else (
        Analysis.objects.filter(model_version=version).defer("embedding"))
    return Prefetch(f"{prefix}analyses", queryset=qs, to_attr=ACTIVE_ATTR)


def with_results(images_qs, model_version: ModelVersion | None = None):
    return images_qs.prefetch_related(analysis_prefetch(model_version))


def result_for_image(image, model_version: ModelVersion | None = None) -> Analysis | None:
    """The analysis of ``image`` for the active version (prefetched when available)."""
    cached = getattr(image, ACTIVE_ATTR, None)
    if cached is not None:
        return cached[0] if cached else None
    if model_version is None:
        return None
    return (Analysis.objects.filter(image_id=image.pk, model_version=model_version)
            .select_related("model_version").defer("embedding").first())
