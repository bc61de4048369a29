from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..context import is_flagged
from ..models import Analysis, ModelVersion


class ModelVersionSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = ModelVersion
        fields = ["id", "name", "architecture", "input_size", "metrics", "threshold", "validated"]
        read_only_fields = fields


class ModelVersionSerializer(serializers.ModelSerializer):
    roc_auc = serializers.SerializerMethodField()
    members = serializers.JSONField(read_only=True, help_text=(
        "Member networks of an ensemble version (name, architecture, input size, initialisation, "
        "held-out metrics alone, combiner weight); empty for one network."))
    has_context_model = serializers.SerializerMethodField()
    context_model = serializers.SerializerMethodField()

    class Meta:
        model = ModelVersion
        fields = ["id", "name", "architecture", "input_size", "sha256", "metrics", "roc_auc", "threshold",
                  "validated", "is_active", "members", "has_context_model", "context_model", "card", "installed_at"]
        read_only_fields = fields

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
    flagged = serializers.SerializerMethodField(
        help_text="The score (final, else image probability) is at or above its operating threshold (the "
                  "context model's for a context score, else the model version's); null without a score.")

    class Meta:
        model = Analysis
        fields = [
            "id", "image", "lesion", "patient", "status", "probability", "member_probabilities",
            "final_score", "final_score_source",
            "flagged", "context_features", "model_version", "error", "attempts", "timings", "embedding_dim",
            "heatmap_url", "heatmap_info", "queued_at", "started_at", "finished_at",
        ]
        read_only_fields = fields

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
        return is_flagged(obj)
