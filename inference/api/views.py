import django_filters
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, renderers, viewsets
from rest_framework.decorators import action

from patients.api.views import ImageRenderer
from patients.models import LesionImage, Patient

from ..models import Analysis, ModelVersion
from .serializers import AnalysisSerializer, ModelVersionSerializer


def visible_analyses(user):
    """Analyses of the patients the user may see (THE visibility rule: Patient.objects.visible_to)."""
    return (
        Analysis.objects.filter(image__lesion__patient__in=Patient.objects.visible_to(user))
        .select_related("model_version", "image__lesion")
        .defer("embedding")
    )


class AnalysisFilter(django_filters.FilterSet):
    lesion = django_filters.NumberFilter(field_name="image__lesion_id")
    patient = django_filters.NumberFilter(field_name="image__lesion__patient_id")

    class Meta:
        model = Analysis
        fields = ["image", "lesion", "patient", "status", "model_version"]


@extend_schema(tags=["analyses"])
class AnalysisViewSet(viewsets.ReadOnlyModelViewSet):
    """Model analyses of images: image-only probability, final (context-adjusted) score, status."""

    serializer_class = AnalysisSerializer
    filterset_class = AnalysisFilter
    ordering_fields = ["queued_at", "finished_at", "probability", "final_score"]
    ordering = ["-queued_at"]

    def get_queryset(self):
        return visible_analyses(self.request.user)

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


@extend_schema(tags=["analyses"])
class ImageAnalysesView(generics.ListAPIView):
    """The analyses of one image (every model version that analysed it)."""

    serializer_class = AnalysisSerializer
    filterset_fields = ["status", "model_version"]
    ordering = ["-queued_at"]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Analysis.objects.none()
        image = get_object_or_404(
            LesionImage.objects.filter(lesion__patient__in=Patient.objects.visible_to(self.request.user)),
            pk=self.kwargs["image_pk"],
        )
        return visible_analyses(self.request.user).filter(image=image)


@extend_schema(tags=["model versions"])
class ModelVersionViewSet(viewsets.ReadOnlyModelViewSet):
    """Installed model versions with their validation metrics, threshold and active flag."""

    serializer_class = ModelVersionSerializer
    queryset = ModelVersion.objects.all()
    filterset_fields = ["is_active", "validated", "architecture"]
    ordering_fields = ["installed_at", "name"]
