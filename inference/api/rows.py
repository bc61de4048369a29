"""Row builder of the analysis lists (melanoma_site.api.rows): ``AnalysisSerializer``'s JSON from
``values_list()`` tuples. What depends on the model version only -- its summary (6 KB of metrics),
the threshold, the score's metrics -- is made once per version per response (by the serializers and
inference.scoring, the definitions) and shared by its rows; tests/test_api_rows.py checks every list
byte for byte against ``AnalysisSerializer``."""
from types import SimpleNamespace

from melanoma_site.api.rows import PLACEHOLDER, Shared, datetime_text, optional_float, url_maker

from .. import scoring
from ..models import Analysis, ModelVersion
from .serializers import ModelVersionSummarySerializer

DONE = Analysis.Status.DONE.value
# One serializer for every response: a ModelSerializer builds its fields from the model on first
# use (half a millisecond per instance), and the summary uses no request or context.
_SUMMARY = ModelVersionSummarySerializer()
# What ModelVersionSummarySerializer, scoring.threshold_for and scoring.metrics_for read: the
# card and the runtime (large, never shown in a list) stay in the database.
VERSION_FIELDS = ("id", "name", "architecture", "input_size", "metrics", "threshold", "validated", "context_model")


class AnalysisRows:
    """``AnalysisSerializer``'s fields. The queryset annotates ``embedding_size`` and ``is_flagged``
    (inference.api.views.visible_analyses)."""

    columns = ("id", "image_id", "image__lesion_id", "image__lesion__patient_id", "status", "probability",
               "member_probabilities", "final_score", "final_score_source", "context_features", "model_version_id",
               "error", "attempts", "timings", "embedding_size", "heatmap", "heatmap_info", "queued_at",
               "started_at", "finished_at", "is_flagged", "context_explanation", "previous_final_score",
               "score_changed_at", "score_change_reason")

    def __init__(self, request):
        self.heatmap_url = url_maker(request, f"/api/v1/analyses/{PLACEHOLDER}/heatmap/")

    def versions(self, ids) -> dict[int, tuple]:
        """{version id: (summary, threshold, metrics of an image score, metrics of a context score)}."""
        out = {}
        for version in ModelVersion.objects.filter(pk__in=ids).order_by().only(*VERSION_FIELDS):
            # scoring.metrics_for decides by the score's source alone: asked once per source, about
            # a stand-in analysis with a score from that source (not a model instance: a costly one)
            image, context = (
                scoring.metrics_for(SimpleNamespace(display_score=0.0, score_source=source, model_version=version))
                for source in ("image", "context"))
            out[version.pk] = (Shared(_SUMMARY.to_representation(version)), scoring.threshold_for(None, version),
                               _shared(image), _shared(context))
        return out

    def __call__(self, tuples) -> list[dict]:
        tuples = list(tuples)
        versions = self.versions({t[10] for t in tuples}) if tuples else {}
        when, heatmap_url, scale = datetime_text(), self.heatmap_url, scoring.SCALE
        rows = []
        for (pk, image, lesion, patient, status, probability, member_probabilities, final_score, final_source,
             context_features, version_id, error, attempts, timings, embedding_size, heatmap, heatmap_info,
             queued_at, started_at, finished_at, flagged, explanation, previous, changed_at, change_reason) in tuples:
            summary, threshold, image_metrics, context_metrics = versions[version_id]
            # Analysis.display_score, .score_source and .context_pending on the values
            score = final_score if final_score is not None else probability
            source = None if score is None else (
                final_source if final_score is not None and final_source else "image")
            rows.append({
                "id": pk, "image": image, "lesion": lesion, "patient": patient, "status": status,
                "probability": optional_float(probability), "member_probabilities": member_probabilities,
                "final_score": optional_float(final_score), "final_score_source": final_source,
                "context_features": context_features, "model_version": summary, "error": error,
                "attempts": attempts, "timings": timings,
                "embedding_dim": None if embedding_size is None else embedding_size // 4,
                "heatmap_url": heatmap_url(pk) if heatmap else None, "heatmap_info": heatmap_info,
                "queued_at": when(queued_at), "started_at": when(started_at), "finished_at": when(finished_at),
                "score": optional_float(score), "threshold": threshold, "flagged": flagged, "scale": scale,
                "source": source,
                "context_pending": status == DONE and probability is not None and final_score is None,
                "model_version_id": version_id,
                "score_metrics": None if score is None else (context_metrics if source == "context" else image_metrics),
                "context_explanation": explanation, "previous_final_score": optional_float(previous),
                "score_changed_at": when(changed_at), "score_change_reason": change_reason,
            })
        return rows


def _shared(value):
    return Shared(value) if isinstance(value, dict) else value
