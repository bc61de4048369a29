"""Row builders of the patient, lesion and image lists (melanoma_site.api.rows): the JSON of
``PatientSerializer``, ``LesionSerializer`` and ``LesionImageSerializer`` built from
``values_list()`` tuples. Each builder follows its serializer's ``Meta.fields`` order and DRF's
output for each field type (a float as float, a date as ISO text, ...); tests/test_api_rows.py
checks every list byte for byte against the serializers."""
from django.urls import reverse

from melanoma_site.api.rows import PLACEHOLDER, date_text, datetime_text, optional_float, url_maker

from ..vocabulary import anatomic_region, is_melanoma_diagnosis


class PatientRows:
    """``PatientSerializer``'s fields."""

    columns = ("id", "mrn", "name", "birth_date", "sex", "fitzpatrick_skin_type", "care_team_id",
               "care_team__name", "created_at", "updated_at", "last_activity_at")

    def __init__(self, request):
        self.lesions_url = url_maker(request, reverse("api:patient-lesions", args=[PLACEHOLDER]))

    def __call__(self, tuples) -> list[dict]:
        when, lesions_url = datetime_text(), self.lesions_url
        return [{
            "id": pk, "mrn": mrn, "name": name, "birth_date": date_text(birth_date), "sex": sex,
            "fitzpatrick_skin_type": skin_type, "care_team": team, "care_team_name": team_name,
            "created_at": when(created), "updated_at": when(updated), "last_activity_at": when(active),
            "lesions_url": lesions_url(pk),
        } for pk, mrn, name, birth_date, sex, skin_type, team, team_name, created, updated, active in tuples]


class LesionRows:
    """``LesionSerializer``'s fields (``NestedLesionSerializer``'s too: the same output). The
    queryset annotates ``image_count`` (patients.api.views)."""

    columns = ("id", "patient_id", "label", "anatomic_site", "body_map_x", "body_map_y", "notes", "diagnosis",
               "image_count", "created_at", "updated_at")

    def __init__(self, request):
        self.images_url = url_maker(request, reverse("api:lesion-images", args=[PLACEHOLDER]))

    def __call__(self, tuples) -> list[dict]:
        when, images_url = datetime_text(), self.images_url
        return [{
            "id": pk, "patient": patient, "label": label, "anatomic_site": site,
            # the model's properties Lesion.anatomic_region and Lesion.is_melanoma, on the values
            "anatomic_region": anatomic_region(site),
            "body_map_x": optional_float(x), "body_map_y": optional_float(y), "notes": notes,
            "diagnosis": diagnosis, "is_melanoma": is_melanoma_diagnosis(diagnosis) if diagnosis else None,
            "image_count": image_count, "images_url": images_url(pk),
            "created_at": when(created), "updated_at": when(updated),
        } for pk, patient, label, site, x, y, notes, diagnosis, image_count, created, updated in tuples]


class ImageRows:
    """``LesionImageSerializer``'s fields."""

    columns = ("id", "lesion_id", "lesion__patient_id", "sha256", "upload_sha256", "width", "height",
               "size_bytes", "format", "original_format", "image_type", "acquired_on", "uploaded_by__username",
               "uploaded_at", "quality")

    def __init__(self, request):
        self.file_url = url_maker(request, reverse("api:image-file", args=[PLACEHOLDER]))
        self.thumbnail_url = url_maker(request, reverse("api:image-thumbnail", args=[PLACEHOLDER]))
        # the route belongs to the inference app (as in LesionImageSerializer.get_analyses_url)
        self.analyses_url = url_maker(request, f"/api/v1/images/{PLACEHOLDER}/analyses/")

    def __call__(self, tuples) -> list[dict]:
        when, file_url, thumbnail_url, analyses_url = (
            datetime_text(), self.file_url, self.thumbnail_url, self.analyses_url)
        return [{
            "id": pk, "lesion": lesion, "patient": patient, "sha256": sha256, "upload_sha256": upload_sha256,
            "width": width, "height": height, "size_bytes": size, "format": fmt, "original_format": original,
            "image_type": image_type, "acquired_on": date_text(acquired_on), "uploaded_by": uploaded_by,
            "uploaded_at": when(uploaded_at), "quality": quality, "file_url": file_url(pk),
            "thumbnail_url": thumbnail_url(pk), "analyses_url": analyses_url(pk),
        } for (pk, lesion, patient, sha256, upload_sha256, width, height, size, fmt, original, image_type,
               acquired_on, uploaded_by, uploaded_at, quality) in tuples]
