import django_filters
from django.db.models.functions import Length
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework.response import Response
from rest_framework import generics, renderers, viewsets
from rest_framework.decorators import action

from melanoma_site.api import BooleanFilter, ChoiceFilter, ContractMixin, FilterSet, IdFilter, NumberFilter
from melanoma_site.api.rows import RowListMixin
from patients.api.views import ImageRenderer, ListAuditMixin
from patients.selectors import visible_images

from .. import selectors
from ..context import flag_annotations
from ..models import Analysis, ModelVersion
from .rows import AnalysisRows
from .serializers import AnalysisSerializer, ModelVersionSerializer


def visible_analyses(user):
    """Analyses the user may see (``inference.selectors.visible_analyses``: the one visibility rule).
    The embedding stays deferred; its size is annotated for ``embedding_dim`` (no query per row)."""
    return (
        selectors.visible_analyses(user)
        .select_related("image__lesion")
        # one query and one decoded object per model version, not its JSON once per row
        .prefetch_related("model_version")
        .annotate(embedding_size=Length("embedding"))
        .annotate(**flag_annotations())
    )


class AnalysisFilter(FilterSet):
    # Ids are plain numbers filtered inside the visible analyses: another team's id reads exactly like
    # one that does not exist (an empty list), and no form lists records.
    image = IdFilter(field_name="image_id", label="Image id")
    lesion = IdFilter(field_name="image__lesion_id", label="Lesion id")
    patient = IdFilter(field_name="image__lesion__patient_id", label="Patient id")
    model_version = IdFilter(field_name="model_version_id", label="Model version id")
    status = ChoiceFilter(choices=Analysis.Status.choices)
    flagged = BooleanFilter(
        field_name="is_flagged",
        label="true: the score (final, else image probability) is at or above its operating threshold; "
              "false: below it. Analyses without a score match neither.",
    )
    final_score__gte = NumberFilter(field_name="final_score", lookup_expr="gte", label="Final score at least")
    final_score__lte = NumberFilter(field_name="final_score", lookup_expr="lte", label="Final score at most")
    probability__gte = NumberFilter(field_name="probability", lookup_expr="gte",
                                    label="Image-only probability at least")
    probability__lte = NumberFilter(field_name="probability", lookup_expr="lte",
                                    label="Image-only probability at most")
    finished_on = django_filters.DateFromToRangeFilter(
        field_name="finished_at",
        label="Date the analysis finished: finished_on_after / finished_on_before (inclusive)")
    acquired_on = django_filters.DateFromToRangeFilter(
        field_name="image__acquired_on",
        label="Acquisition date of the image: acquired_on_after / acquired_on_before (inclusive)")

    class Meta:
        model = Analysis
        fields = []


class ImageAnalysisFilter(FilterSet):
    status = ChoiceFilter(choices=Analysis.Status.choices)
    model_version = IdFilter(field_name="model_version_id", label="Model version id")

    class Meta:
        model = Analysis
        fields = []


class ModelVersionFilter(FilterSet):
    is_active = BooleanFilter(field_name="is_active", label="The version new uploads are scored with")
    validated = BooleanFilter(field_name="validated", label="Validated for clinical use")
    architecture = django_filters.CharFilter(field_name="architecture", label="Backbone, e.g. se_resnet50")

    class Meta:
        model = ModelVersion
        fields = []


ANALYSIS_ORDERING = ["queued_at", "finished_at", "probability", "final_score"]


@extend_schema_view(
    list=extend_schema(summary="Analyses of the patients you can see, newest first; filter by flag, score, "
                               "status, model version, patient, dates"),
    retrieve=extend_schema(summary="One analysis"),
)
@extend_schema(tags=["analyses"])
class AnalysisViewSet(ListAuditMixin, RowListMixin, ContractMixin, viewsets.ReadOnlyModelViewSet):
    """Model analyses of images: image-only probability, final (context-adjusted) score, status."""

    serializer_class = AnalysisSerializer
    list_rows = AnalysisRows
    filterset_class = AnalysisFilter
    ordering_fields = ANALYSIS_ORDERING
    ordering = ["-queued_at"]

    def get_queryset(self):
        return visible_analyses(self.request.user)

    def finalize_response(self, request, response, *args, **kwargs):
        # An error from the heatmap route is JSON, whatever image type the Accept header asked for.
        if isinstance(response, Response) and response.status_code >= 400 and isinstance(
                getattr(request, "accepted_renderer", None), ImageRenderer):
            request.accepted_renderer, request.accepted_media_type = renderers.JSONRenderer(), "application/json"
        return super().finalize_response(request, response, *args, **kwargs)

    @extend_schema(summary="The analysis's Grad-CAM heatmap (transparent PNG over the image; 404 until made)",
                   responses={(200, "image/png"): OpenApiTypes.BINARY,
                              404: OpenApiResponse(description="No such analysis, not one of your patients', "
                                                               "or no heatmap yet.")})
    @action(detail=True, methods=["get"], renderer_classes=[renderers.JSONRenderer, ImageRenderer],
            filter_backends=[], pagination_class=None)
    def heatmap(self, request, pk=None):
        from ..views import serve_heatmap

        analysis = self.get_object()
        return serve_heatmap(request, analysis, user=request.user)


@extend_schema(tags=["analyses"], summary="The analyses of one image (every model version that analysed it)")
class ImageAnalysesView(ListAuditMixin, RowListMixin, ContractMixin, generics.ListAPIView):
    """The analyses of one image (every model version that analysed it)."""

    serializer_class = AnalysisSerializer
    list_rows = AnalysisRows
    filterset_class = ImageAnalysisFilter
    ordering_fields = ANALYSIS_ORDERING
    ordering = ["-queued_at"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Analysis.objects.none()
        image = get_object_or_404(
            visible_images(self.request.user), pk=self.kwargs["image_pk"],
        )
        return visible_analyses(self.request.user).filter(image=image)


@extend_schema(tags=["model versions"])
class ModelVersionViewSet(ContractMixin, viewsets.ReadOnlyModelViewSet):
    """Installed model versions with their validation metrics, threshold and active flag."""

    serializer_class = ModelVersionSerializer
    queryset = ModelVersion.objects.all()
    filterset_class = ModelVersionFilter
    ordering_fields = ["installed_at", "name"]
    ordering = ["-installed_at"]
