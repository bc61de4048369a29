"""API representations. Writes are validated here for shape only; the services decide and store."""
import copy

from django.conf import settings
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from melanoma_site.api import StrictJSONMixin
from melanoma_site.api.rows import PLACEHOLDER, url_maker

from ..models import CareTeam, Lesion, LesionImage, LesionReview, Patient
from ..selectors import visible_lesions, visible_patients
from ..vocabulary import ANATOMIC_SITE_CHOICES, DIAGNOSIS_CHOICES, FITZPATRICK_CHOICES


class VocabularyChoiceField(serializers.ChoiceField):
    """A choice field over a fixed vocabulary (hundreds of ISIC terms). DRF deep-copies a
    serializer's declared fields for every serializer it makes, and copying a ChoiceField copies and
    re-indexes all of its choices: most of a lesion list's serialisation time. The vocabulary never
    changes, so a copy shares it."""

    def __deepcopy__(self, memo):
        clone = copy.copy(self)
        memo[id(self)] = clone
        return clone


def _url(serializer, viewname: str, pk) -> str:
    """The absolute URL of ``viewname`` for object ``pk``. reverse() and build_absolute_uri() run
    once per list response (a URL with a placeholder id, kept in the serializer context), not
    once per row."""
    context = serializer.context
    makers = context.setdefault("_url_makers", {}) if context else {}
    make = makers.get(viewname)
    if make is None:
        make = makers[viewname] = url_maker(context.get("request") if context else None,
                                            reverse(viewname, args=[PLACEHOLDER]))
    return make(pk)


def _user(serializer):
    request = serializer.context.get("request")
    return getattr(request, "user", None)


@extend_schema_field(serializers.IntegerField(allow_null=True))
class VisibleCareTeamField(serializers.PrimaryKeyRelatedField):
    """A care team the user may assign patients to: a team they are on (staff: any team)."""

    def get_queryset(self):
        user = _user(self)
        if user is None or not user.is_authenticated:
            return CareTeam.objects.none()
        return CareTeam.objects.all() if user.is_staff else CareTeam.objects.filter(members=user)


@extend_schema_field(serializers.IntegerField())
class VisiblePatientField(serializers.PrimaryKeyRelatedField):
    """A patient visible to the user; any other id reads as "does not exist" (never leaks)."""

    def get_queryset(self):
        return visible_patients(_user(self))


@extend_schema_field(serializers.IntegerField())
class VisibleLesionField(serializers.PrimaryKeyRelatedField):
    def get_queryset(self):
        return visible_lesions(_user(self))


class CareTeamSummarySerializer(serializers.ModelSerializer):
    class Meta:
        model = CareTeam
        fields = ["id", "name"]
        read_only_fields = fields


class PatientSerializer(StrictJSONMixin, serializers.ModelSerializer):
    care_team = VisibleCareTeamField(
        required=False, allow_null=True,
        help_text="Care team id. Defaults to the user's only care team; clinicians may only choose a "
                  "team they are a member of.",
    )
    care_team_name = serializers.CharField(source="care_team.name", read_only=True)
    sex = serializers.ChoiceField(choices=Patient.Sex.choices, required=False)
    fitzpatrick_skin_type = serializers.ChoiceField(choices=FITZPATRICK_CHOICES, required=False, allow_blank=True)
    lesions_url = serializers.SerializerMethodField()

    class Meta:
        model = Patient
        fields = [
            "id", "mrn", "name", "birth_date", "sex", "fitzpatrick_skin_type", "care_team", "care_team_name",
            "created_at", "updated_at", "last_activity_at", "lesions_url",
        ]
        read_only_fields = ["id", "created_at", "updated_at", "last_activity_at"]
        extra_kwargs = {"mrn": {"validators": []}}  # uniqueness is the service's field error

    @extend_schema_field(serializers.URLField())
    def get_lesions_url(self, obj) -> str:
        return _url(self, "api:patient-lesions", obj.pk)


class LesionSerializer(StrictJSONMixin, serializers.ModelSerializer):
    patient = VisiblePatientField(help_text="Patient id (a patient you can see).")
    anatomic_site = VocabularyChoiceField(choices=ANATOMIC_SITE_CHOICES, required=False, allow_blank=True)
    diagnosis = VocabularyChoiceField(choices=DIAGNOSIS_CHOICES, required=False, allow_blank=True)
    body_map_x = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    body_map_y = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    anatomic_region = serializers.CharField(read_only=True)
    is_melanoma = serializers.BooleanField(read_only=True, allow_null=True)
    image_count = serializers.SerializerMethodField()
    images_url = serializers.SerializerMethodField()

    class Meta:
        model = Lesion
        fields = [
            "id", "patient", "label", "anatomic_site", "anatomic_region", "body_map_x", "body_map_y", "notes",
            "diagnosis", "is_melanoma", "image_count", "images_url", "created_at", "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    @extend_schema_field(serializers.IntegerField())
    def get_image_count(self, obj) -> int:
        count = getattr(obj, "image_count", None)
        return count if count is not None else obj.images.count()

    @extend_schema_field(serializers.URLField())
    def get_images_url(self, obj) -> str:
        return _url(self, "api:lesion-images", obj.pk)


class LesionUpdateSerializer(LesionSerializer):
    """PUT / PATCH of a lesion: ``patient`` may be given (a client sending back what it read) but a
    lesion never moves to another patient."""

    patient = VisiblePatientField(required=False, help_text="The lesion's own patient id (it cannot change).")

    def validate(self, attrs):
        patient = attrs.pop("patient", None)
        if patient is not None and self.instance is not None and patient.pk != self.instance.patient_id:
            raise serializers.ValidationError(
                {"patient": [serializers.ErrorDetail("A lesion cannot be moved to another patient.", code="rejected")]})
        return attrs


class NestedLesionSerializer(LesionSerializer):
    """A lesion created under ``patients/{id}/lesions/``: the patient comes from the URL."""

    patient = serializers.PrimaryKeyRelatedField(read_only=True)


def _absolute(serializer, path: str) -> str:
    request = serializer.context.get("request")
    return request.build_absolute_uri(path) if request is not None else path


class LesionImageSerializer(serializers.ModelSerializer):
    patient = serializers.IntegerField(source="lesion.patient_id", read_only=True)
    uploaded_by = serializers.CharField(source="uploaded_by.username", read_only=True, allow_null=True,
                                        default=None)
    file_url = serializers.SerializerMethodField()
    thumbnail_url = serializers.SerializerMethodField()
    analyses_url = serializers.SerializerMethodField()

    class Meta:
        model = LesionImage
        fields = [
            "id", "lesion", "patient", "sha256", "upload_sha256", "width", "height", "size_bytes", "format",
            "original_format", "image_type", "acquired_on", "uploaded_by", "uploaded_at", "quality", "file_url",
            "thumbnail_url", "analyses_url",
        ]
        read_only_fields = fields
        extra_kwargs = {"quality": {"help_text": (
            "Upload quality check (warnings only, never a refusal): short_side (px), sharpness (variance "
            "of the Laplacian), brightness (0-255), dark/bright_fraction, and warnings [{code: small | "
            "blurred | underexposed | overexposed, message}]. Empty when not assessed.")}}

    @extend_schema_field(serializers.URLField())
    def get_file_url(self, obj) -> str:
        return _url(self, "api:image-file", obj.pk)

    @extend_schema_field(serializers.URLField())
    def get_thumbnail_url(self, obj) -> str:
        return _url(self, "api:image-thumbnail", obj.pk)

    @extend_schema_field(serializers.URLField())
    def get_analyses_url(self, obj) -> str:
        # The route belongs to the inference app; only the address is built here.
        return _absolute(self, f"/api/v1/images/{obj.pk}/analyses/")


class UploadedImageSerializer(LesionImageSerializer):
    created = serializers.SerializerMethodField(help_text="False when the same bytes were already stored "
                                                          "for this lesion (that image is returned).")

    class Meta(LesionImageSerializer.Meta):
        fields = [*LesionImageSerializer.Meta.fields, "created"]
        read_only_fields = fields

    @extend_schema_field(serializers.BooleanField())
    def get_created(self, obj) -> bool:
        return bool(self.context.get("created", False))


class ImageUploadSerializer(serializers.Serializer):
    """multipart/form-data: one or several ``files`` (or one ``file``), image type and acquisition date."""

    lesion = VisibleLesionField(help_text="Lesion id (a lesion you can see).")
    files = serializers.ListField(
        child=serializers.FileField(allow_empty_file=True, use_url=False), required=False,
        max_length=settings.UPLOAD_MAX_FILES,
        help_text=f"One or several image files (JPEG, PNG, TIFF or BMP), at most {settings.UPLOAD_MAX_FILES} "
                  "with `file`.",
    )
    file = serializers.FileField(allow_empty_file=True, use_url=False, required=False,
                                 help_text="A single image file (alternative to `files`).")
    image_type = serializers.ChoiceField(choices=LesionImage.ImageType.choices)
    acquired_on = serializers.DateField(help_text="Acquisition date (YYYY-MM-DD).")

    def validate(self, attrs):
        files = list(attrs.pop("files", None) or [])
        if attrs.get("file") is not None:
            files.append(attrs.pop("file"))
        attrs.pop("file", None)
        if not files:  # not expressible in the schema (either field may carry them): 422
            raise serializers.ValidationError(
                {"files": [serializers.ErrorDetail("Choose at least one image file.", code="rejected")]})
        attrs["files"] = files
        return attrs


class NestedImageUploadSerializer(ImageUploadSerializer):
    """Upload under ``lesions/{id}/images/``: the lesion comes from the URL."""

    lesion = None


class LesionReviewSerializer(serializers.ModelSerializer):
    """A review decision on a lesion. Append-only: create a new one to change a decision."""

    lesion = VisibleLesionField(help_text="Lesion id (a lesion you can see).")
    patient = serializers.IntegerField(source="lesion.patient_id", read_only=True)
    decision = serializers.ChoiceField(choices=LesionReview.Decision.choices)
    note = serializers.CharField(required=False, allow_blank=True, max_length=5000)
    follow_up_months = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, max_value=60,
        help_text="Follow-up interval in months (1-60); sets follow_up_due. Omit for no follow-up.")
    reviewed_by = serializers.CharField(source="reviewed_by.username", read_only=True)
    in_force = serializers.SerializerMethodField(help_text="False once a later review of the lesion supersedes it.")

    class Meta:
        model = LesionReview
        fields = ["id", "lesion", "patient", "decision", "note", "follow_up_months", "follow_up_due",
                  "supersedes", "in_force", "result_snapshot", "reviewed_by", "created_at"]
        read_only_fields = ["id", "follow_up_due", "supersedes", "result_snapshot", "reviewed_by", "created_at"]

    @extend_schema_field(serializers.BooleanField())
    def get_in_force(self, obj) -> bool:
        return obj.is_current
