"""REST API for patients, lesions and images (DRF), under /api/v1/.

Every queryset starts from ``Patient.objects.visible_to(user)`` (via patients.selectors), so another
care team's records answer 404 on every route, nested ones included. Every write goes through
patients.services; a Django ValidationError from a service becomes a 400 with field errors.
"""
import json

import django_filters

from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import generics, mixins, parsers, renderers, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from melanoma_site.api import ContractMixin, FilterSet, IdFilter
from melanoma_site.api.rows import RowListMixin

from .. import media, services
from ..models import LesionImage, LesionReview, Patient
from ..selectors import visible_images, visible_lesions, visible_patients, visible_reviews
from ..uploads import UploadRejected
from .filters import LesionFilter, LesionImageFilter, PatientFilter
from .rows import ImageRows, LesionRows, PatientRows
from .serializers import (
    ImageUploadSerializer,
    LesionImageSerializer,
    LesionReviewSerializer,
    LesionSerializer,
    LesionUpdateSerializer,
    NestedImageUploadSerializer,
    NestedLesionSerializer,
    PatientSerializer,
    UploadedImageSerializer,
)


REJECTED = "rejected"  # the services' refusals: answered 422 (melanoma_site.api)


def _rejected(messages) -> list:
    return [serializers.ErrorDetail(str(m), code=REJECTED) for m in messages]


def drf_error(exc: DjangoValidationError) -> serializers.ValidationError:
    """A service's ValidationError as DRF field errors ({"field": ["message", ...]}), code "rejected"."""
    if isinstance(exc, UploadRejected) and hasattr(exc, "error_dict"):
        # {client file name: [reasons]} -> {"files": ["name: reason", ...]}
        return serializers.ValidationError(
            {"files": _rejected(f"{name}: {reason}" for name, reasons in exc.message_dict.items() for reason in reasons)}
        )
    if hasattr(exc, "error_dict"):
        return serializers.ValidationError(
            {("non_field_errors" if key == NON_FIELD_ERRORS else key): _rejected(value)
             for key, value in exc.message_dict.items()}
        )
    return serializers.ValidationError({"non_field_errors": _rejected(exc.messages)})


class ServiceErrorsMixin(ContractMixin):
    """Service and request-parsing errors as DRF errors (JSON 422/400 with a message), never a bare 400
    page; query parameters checked (melanoma_site.api.ContractMixin)."""

    def handle_exception(self, exc):
        if isinstance(exc, DjangoValidationError):
            exc = drf_error(exc)
        elif isinstance(exc, TooManyFilesSent):
            exc = serializers.ValidationError(
                {"files": [f"At most {settings.UPLOAD_MAX_FILES} files at once; upload the rest separately."]})
        elif isinstance(exc, (RequestDataTooBig, TooManyFieldsSent)):
            exc = serializers.ValidationError({"non_field_errors": ["The request is too large."]})
        return super().handle_exception(exc)


class ListAuditMixin:
    """Every list read through the API is recorded: ONE audit entry per request (the list's route,
    its query parameters, the count, the ids shown and their patients), never one per row."""

    def list(self, request, *args, **kwargs):
        response = super().list(request, *args, **kwargs)
        if response.status_code == 200:
            data = response.data
            rows = data.get("results", []) if isinstance(data, dict) else data
            count = data.get("count") if isinstance(data, dict) else len(rows)
            model = self.get_serializer_class().Meta.model
            ids = [row["id"] for row in rows]
            match = request.resolver_match
            services.record_list_access(
                user=request.user, model=model, query=request.query_params, count=count,
                listing=f"api:{match.url_name}" if match and match.url_name else request.path, shown=ids,
                patients=ids if model is Patient else [row.get("patient") for row in rows])
        return response


class ImageRenderer(renderers.BaseRenderer):
    """Lets ``Accept: image/*`` reach the file views (which answer with a FileResponse)."""

    media_type = "image/*"
    format = "image"
    charset = None
    render_style = "binary"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        # Only error bodies (404, 401) are rendered here; files bypass the renderers.
        return json.dumps(data).encode() if data is not None else b""


PATIENT_ORDERING = ["name", "mrn", "birth_date", "created_at", "updated_at", "last_activity_at"]


@extend_schema_view(
    list=extend_schema(summary="Patients on your care teams (staff: all), most recently active first"),
    retrieve=extend_schema(summary="One patient (recorded in the audit trail as viewed)"),
    destroy=extend_schema(summary="Delete a patient with lesions and images (staff only)"),
)
@extend_schema(tags=["patients"])
class PatientViewSet(ListAuditMixin, RowListMixin, ServiceErrorsMixin, viewsets.ModelViewSet):
    serializer_class = PatientSerializer
    list_rows = PatientRows
    parser_classes = [parsers.JSONParser]
    filterset_class = PatientFilter
    search_fields = ["mrn", "name"]
    ordering_fields = PATIENT_ORDERING
    ordering = ["-last_activity_at", "id"]

    def get_queryset(self):
        return visible_patients(self.request.user)

    def retrieve(self, request, *args, **kwargs):
        patient = self.get_object()
        services.record_access(user=request.user, obj=patient)
        return Response(self.get_serializer(patient).data)

    def perform_create(self, serializer):
        serializer.instance = services.create_patient(user=self.request.user, **serializer.validated_data)

    def perform_update(self, serializer):
        serializer.instance = services.update_patient(
            user=self.request.user, patient=serializer.instance, data=dict(serializer.validated_data)
        )

    def perform_destroy(self, instance):
        services.delete_patient(user=self.request.user, patient=instance)


def _lesions(user):
    # A correlated count rather than Count("images") with its join and GROUP BY: a list's COUNT(*)
    # leaves an unused subquery out, so it no longer joins and groups every image of every lesion.
    images = (LesionImage.objects.filter(lesion=OuterRef("pk")).order_by().values("lesion")
              .annotate(n=Count("*")).values("n"))
    return visible_lesions(user).annotate(image_count=Coalesce(Subquery(images), 0))


@extend_schema_view(
    retrieve=extend_schema(summary="One lesion (recorded in the audit trail as viewed)"),
)
@extend_schema(tags=["lesions"])
class LesionViewSet(ListAuditMixin, RowListMixin, ServiceErrorsMixin, viewsets.ModelViewSet):
    serializer_class = LesionSerializer
    list_rows = LesionRows
    parser_classes = [parsers.JSONParser]
    filterset_class = LesionFilter
    search_fields = ["label", "notes", "patient__mrn", "patient__name"]
    ordering_fields = ["label", "anatomic_site", "created_at", "updated_at"]
    ordering = ["patient_id", "anatomic_site", "label", "id"]

    def get_queryset(self):
        return _lesions(self.request.user)

    def get_serializer_class(self):
        return LesionUpdateSerializer if self.action in ("update", "partial_update") else LesionSerializer

    def retrieve(self, request, *args, **kwargs):
        lesion = self.get_object()
        services.record_access(user=request.user, obj=lesion)
        return Response(self.get_serializer(lesion).data)

    def perform_create(self, serializer):
        serializer.instance = services.create_lesion(user=self.request.user, **serializer.validated_data)

    def perform_update(self, serializer):
        serializer.instance = services.update_lesion(
            user=self.request.user, lesion=serializer.instance, data=dict(serializer.validated_data))

    def perform_destroy(self, instance):
        services.delete_lesion(user=self.request.user, lesion=instance)


@extend_schema(tags=["lesions"])
@extend_schema_view(
    get=extend_schema(summary="Lesions of one patient"),
    post=extend_schema(summary="Add a lesion to this patient"),
)
class PatientLesionsView(ListAuditMixin, RowListMixin, ServiceErrorsMixin, generics.ListCreateAPIView):
    serializer_class = NestedLesionSerializer
    list_rows = LesionRows
    parser_classes = [parsers.JSONParser]
    filterset_class = LesionFilter
    search_fields = ["label", "notes"]
    ordering_fields = ["label", "anatomic_site", "created_at", "updated_at"]
    ordering = ["anatomic_site", "label", "id"]

    def get_patient(self):
        if not hasattr(self, "_patient"):
            self._patient = get_object_or_404(visible_patients(self.request.user), pk=self.kwargs["patient_pk"])
        return self._patient

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return _lesions(None)
        return _lesions(self.request.user).filter(patient=self.get_patient())

    def perform_create(self, serializer):
        serializer.instance = services.create_lesion(
            user=self.request.user, patient=self.get_patient(), **serializer.validated_data
        )


def _upload_response(outcomes, serializer_context):
    """One item per uploaded file, in order, each with its ``created`` flag; 201 if anything is new."""
    data = [UploadedImageSerializer(o.image, context={**serializer_context, "created": o.created}).data
            for o in outcomes]
    any_created = any(o.created for o in outcomes)
    return Response(data, status=status.HTTP_201_CREATED if any_created else status.HTTP_200_OK)


UPLOAD_RESPONSES = {
    201: OpenApiResponse(UploadedImageSerializer(many=True),
                         description="At least one new image stored. One item per uploaded file, in order; "
                                     "`created` is false where the same bytes were already stored."),
    200: OpenApiResponse(UploadedImageSerializer(many=True),
                         description="Every file was already stored for this lesion; those images are returned."),
    422: OpenApiResponse(description='Nothing stored: a file was refused (errors name it, e.g. '
                                     '{"files": ["name.jpg: not an image"]}), or the lesion is not one you can see, '
                                     'or the date is in the future.'),
}


def _upload(view, request, lesion=None):
    serializer_class = NestedImageUploadSerializer if lesion is not None else ImageUploadSerializer
    serializer = serializer_class(data=request.data, context=view.get_serializer_context())
    serializer.is_valid(raise_exception=True)
    data = serializer.validated_data
    outcomes = services.upload_images(
        user=request.user, lesion=lesion if lesion is not None else data["lesion"], files=data["files"],
        image_type=data["image_type"], acquired_on=data["acquired_on"],
    )
    return _upload_response(outcomes, view.get_serializer_context())


FILE_RESPONSES = {
    (200, "image/jpeg"): OpenApiTypes.BINARY,
    (200, "image/png"): OpenApiTypes.BINARY,
    304: OpenApiResponse(description="Not modified: If-None-Match names the stored file's ETag."),
    404: OpenApiResponse(description="No such image, or not one of your patients'."),
}
IF_NONE_MATCH = OpenApiParameter(
    "If-None-Match", str, OpenApiParameter.HEADER, required=False,
    description="ETag(s) of a copy you hold (from an earlier response's ETag header); 304 when it is current.",
)


@extend_schema_view(
    list=extend_schema(summary="Images of the patients you can see"),
    retrieve=extend_schema(summary="One image's metadata (recorded in the audit trail as viewed)"),
    destroy=extend_schema(summary="Delete an image and its stored files"),
)
@extend_schema(tags=["images"])
class LesionImageViewSet(ListAuditMixin, RowListMixin, ServiceErrorsMixin, mixins.ListModelMixin,
                         mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    serializer_class = LesionImageSerializer
    list_rows = ImageRows
    filterset_class = LesionImageFilter
    ordering_fields = ["acquired_on", "uploaded_at", "id", "size_bytes"]
    ordering = ["acquired_on", "uploaded_at", "id"]
    parser_classes = [parsers.MultiPartParser]

    def get_queryset(self):
        return visible_images(self.request.user)

    def finalize_response(self, request, response, *args, **kwargs):
        # An error from the file routes is JSON, whatever image type the Accept header asked for.
        if isinstance(response, Response) and response.status_code >= 400 and isinstance(
                getattr(request, "accepted_renderer", None), ImageRenderer):
            request.accepted_renderer, request.accepted_media_type = renderers.JSONRenderer(), "application/json"
        return super().finalize_response(request, response, *args, **kwargs)

    def retrieve(self, request, *args, **kwargs):
        image = self.get_object()
        services.record_access(user=request.user, obj=image)
        return Response(self.get_serializer(image).data)

    @extend_schema(
        summary="Upload one or several images to a lesion (all or nothing)",
        request={"multipart/form-data": ImageUploadSerializer},
        responses=UPLOAD_RESPONSES,
    )
    def create(self, request, *args, **kwargs):
        return _upload(self, request)

    def perform_destroy(self, instance):
        services.delete_image(user=self.request.user, image=instance)

    @extend_schema(summary="The stored image file (re-encoded, metadata removed)", responses=FILE_RESPONSES,
                   parameters=[IF_NONE_MATCH])
    @action(detail=True, methods=["get"], renderer_classes=[renderers.JSONRenderer, ImageRenderer],
            filter_backends=[], pagination_class=None)
    def file(self, request, pk=None):
        return media.serve_image(request, self.get_object(), media.FILE, user=request.user)

    @extend_schema(summary="The image's thumbnail (JPEG)", parameters=[IF_NONE_MATCH],
                   responses={(200, "image/jpeg"): OpenApiTypes.BINARY, 304: FILE_RESPONSES[304],
                              404: FILE_RESPONSES[404]})
    @action(detail=True, methods=["get"], renderer_classes=[renderers.JSONRenderer, ImageRenderer],
            filter_backends=[], pagination_class=None)
    def thumbnail(self, request, pk=None):
        return media.serve_image(request, self.get_object(), media.THUMBNAIL, user=request.user)


@extend_schema(tags=["images"])
class LesionImagesView(ListAuditMixin, RowListMixin, ServiceErrorsMixin, generics.ListAPIView):
    serializer_class = LesionImageSerializer
    list_rows = ImageRows
    filterset_class = LesionImageFilter
    ordering_fields = ["acquired_on", "uploaded_at", "id"]
    ordering = ["acquired_on", "uploaded_at", "id"]
    parser_classes = [parsers.MultiPartParser]

    def get_lesion(self):
        if not hasattr(self, "_lesion"):
            self._lesion = get_object_or_404(visible_lesions(self.request.user), pk=self.kwargs["lesion_pk"])
        return self._lesion

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return visible_images(None)
        return visible_images(self.request.user).filter(lesion=self.get_lesion())

    @extend_schema(summary="Images of one lesion, in date order")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(
        summary="Upload one or several images to this lesion (all or nothing)",
        request={"multipart/form-data": NestedImageUploadSerializer},
        responses=UPLOAD_RESPONSES,
    )
    def post(self, request, *args, **kwargs):
        return _upload(self, request, lesion=self.get_lesion())


class LesionReviewFilter(FilterSet):
    # plain ids filtered inside the visible reviews: a foreign id reads like an unknown one
    lesion = IdFilter(field_name="lesion_id", label="Lesion id")
    patient = IdFilter(field_name="lesion__patient_id", label="Patient id")
    in_force = django_filters.BooleanFilter(field_name="superseded_by", lookup_expr="isnull",
                                            help_text="true: only the review in force of each lesion.")
    follow_up_due_before = django_filters.DateFilter(field_name="follow_up_due", lookup_expr="lte")

    class Meta:
        model = LesionReview
        fields = ["lesion", "patient", "decision", "in_force", "follow_up_due_before"]


@extend_schema_view(
    list=extend_schema(summary="Review decisions on the lesions of the patients you can see, newest first"),
    retrieve=extend_schema(summary="One review decision"),
    create=extend_schema(summary="Record a review decision on a lesion (supersedes the lesion's previous one)"),
)
@extend_schema(tags=["reviews"])
class LesionReviewViewSet(ListAuditMixin, ServiceErrorsMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin,
                          mixins.CreateModelMixin, viewsets.GenericViewSet):
    """Append-only: reviews are never edited or deleted; a later review of the lesion supersedes."""

    serializer_class = LesionReviewSerializer
    filterset_class = LesionReviewFilter
    parser_classes = [parsers.JSONParser]
    ordering_fields = ["created_at", "follow_up_due"]
    ordering = ["-created_at", "-id"]

    def get_queryset(self):
        return visible_reviews(self.request.user)

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = services.record_review(
            user=self.request.user, lesion=data["lesion"], decision=data["decision"],
            note=data.get("note", ""), follow_up_months=data.get("follow_up_months"))
