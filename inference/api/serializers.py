from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .. import scoring
from ..models import Analysis, ModelVersion


def _context_metrics(obj):
    summary = obj.context_model_summary
    return None if summary is None else summary.get("metrics") or {}


class ModelVersionSummarySerializer(serializers.ModelSerializer):
    context_metrics = serializers.SerializerMethodField(help_text=(
        "Metrics of image + patient context (the context model's evaluation: ROC-AUC, sensitivity, "
        "specificity and share flagged at the version's threshold, with its data and assumption); "
        "null without a context model."))

    class Meta:
        model = ModelVersion
        fields = ["id", "name", "architecture", "input_size", "metrics", "threshold", "validated", "context_metrics"]
        read_only_fields = fields
        extra_kwargs = {"metrics": {"help_text": "Image model's held-out metrics (the model card's)."},
                        "threshold": {"help_text": "THE operating threshold of every score of this version "
                                                   "(image-only and context-adjusted, one scale)."}}

    @extend_schema_field(serializers.JSONField(allow_null=True))
    def get_context_metrics(self, obj):
        return _context_metrics(obj)


class ModelVersionSerializer(serializers.ModelSerializer):
    roc_auc = serializers.SerializerMethodField()
    members = serializers.JSONField(read_only=True, help_text=(
        "Member networks of an ensemble version (name, architecture, input size, initialisation, "
        "held-out metrics alone, combiner weight); empty for one network."))
    has_context_model = serializers.SerializerMethodField()
    context_model = serializers.SerializerMethodField()
    image_metrics = serializers.SerializerMethodField(help_text=(
        "The image model's held-out metrics (same as `metrics`): what produced an image-only score."))
    context_metrics = serializers.SerializerMethodField(help_text=(
        "Image + patient context: the context model's evaluation (ROC-AUC, sensitivity, specificity, "
        "share flagged at `threshold`, data and assumption); null without a context model."))
    scale = serializers.SerializerMethodField(help_text="The scale of every score of this version.")

    class Meta:
        model = ModelVersion
        fields = ["id", "name", "architecture", "input_size", "sha256", "metrics", "roc_auc", "threshold",
                  "validated", "is_active", "members", "has_context_model", "context_model", "card", "installed_at",
                  "image_metrics", "context_metrics", "scale"]
        read_only_fields = fields

    @extend_schema_field(serializers.JSONField())
    def get_image_metrics(self, obj):
        return obj.metrics or {}

    @extend_schema_field(serializers.JSONField(allow_null=True))
    def get_context_metrics(self, obj):
        return _context_metrics(obj)

    @extend_schema_field(serializers.CharField())
    def get_scale(self, obj) -> str:
        return scoring.SCALE

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_roc_auc(self, obj):
        value = obj.roc_auc
        return float(value) if isinstance(value, (int, float)) else None

    @extend_schema_field(serializers.BooleanField())
    def get_has_context_model(self, obj) -> bool:
        return bool(obj.context_model)

    @extend_schema_field(serializers.JSONField(allow_null=True))
    def get_context_model(self, obj):
        """Training data (simulated or real patients, assumed resemblance), metrics, threshold."""
        return obj.context_model_summary


class AnalysisSerializer(serializers.ModelSerializer):
    model_version = ModelVersionSummarySerializer(read_only=True)
    lesion = serializers.IntegerField(source="image.lesion_id", read_only=True)
    patient = serializers.IntegerField(source="image.lesion.patient_id", read_only=True)
    embedding_dim = serializers.IntegerField(read_only=True, allow_null=True)
    heatmap_url = serializers.SerializerMethodField(
        help_text="Grad-CAM heatmap (transparent PNG at the image's proportions), once the worker has made "
                  "it; null before. Served with the same access check as the image.")
    score = serializers.FloatField(source="display_score", read_only=True, allow_null=True, help_text=(
        "THE score: the final score, or the image probability while the context score is pending; a "
        "calibrated melanoma probability (see `scale`), compared with `threshold`."))
    threshold = serializers.SerializerMethodField(help_text=(
        "The operating threshold `score` is compared with: the producing model version's (one per version)."))
    flagged = serializers.SerializerMethodField(help_text="`score` >= `threshold` on a finished analysis.")
    scale = serializers.SerializerMethodField(help_text=(
        f"`{scoring.SCALE}`: {scoring.SCALE_DESCRIPTION}."))
    source = serializers.CharField(source="score_source", read_only=True, allow_null=True, help_text=(
        "What produced `score`: `image` (image model) or `context` (image model + patient context)."))
    context_pending = serializers.BooleanField(read_only=True, help_text=(
        "True while the version has a context model and this analysis' context score is not in yet "
        "(`score` is then the image probability)."))
    model_version_id = serializers.IntegerField(read_only=True, help_text="The model version that produced `score`.")
    score_metrics = serializers.SerializerMethodField(help_text=(
        "Metrics of the model that produced `score` (image model's held-out metrics, or image + context)."))

    class Meta:
        model = Analysis
        fields = [
            "id", "image", "lesion", "patient", "status", "probability", "member_probabilities",
            "final_score", "final_score_source",
            "context_features", "model_version", "error", "attempts", "timings", "embedding_dim",
            "heatmap_url", "heatmap_info", "queued_at", "started_at", "finished_at",
            "score", "threshold", "flagged", "scale", "source", "context_pending", "model_version_id",
            "score_metrics", "context_explanation", "previous_final_score", "score_changed_at",
            "score_change_reason",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "probability": {"help_text": "Image-only calibrated melanoma probability (same scale as `score`)."},
            "final_score": {"help_text": "Final score (context-adjusted, or the image probability without a "
                                         "context model); null while the context score is pending."},
            "context_explanation": {"help_text": "What the patient context changed and why: direction "
                                                 "(raised/lowered/unchanged/none), text, main reason, lesions compared."},
            "previous_final_score": {"help_text": "The score before it last changed because something other than "
                                                  "this image changed (another lesion, the records); see "
                                                  "`score_change_reason`."},
        }

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_threshold(self, obj):
        return scoring.threshold_for(obj)

    @extend_schema_field(serializers.CharField())
    def get_scale(self, obj) -> str:
        return scoring.SCALE

    @extend_schema_field(serializers.JSONField(allow_null=True))
    def get_score_metrics(self, obj):
        return scoring.metrics_for(obj)

    @extend_schema_field(serializers.URLField(allow_null=True))
    def get_heatmap_url(self, obj):
        if not obj.heatmap:
            return None
        request = self.context.get("request")
        path = f"/api/v1/analyses/{obj.pk}/heatmap/"
        return request.build_absolute_uri(path) if request is not None else path

    @extend_schema_field(serializers.BooleanField(allow_null=True))
    def get_flagged(self, obj) -> bool | None:
        if hasattr(obj, "is_flagged"):  # annotated by the API's querysets (inference.context.flag_annotations)
            return obj.is_flagged
        return None if obj.display_score is None else scoring.is_flagged(obj)
