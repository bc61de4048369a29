import django_filters

from melanoma_site.api import ChoiceFilter, FilterSet, IdFilter

from ..models import Lesion, LesionImage, Patient
from ..vocabulary import ANATOMIC_SITE_CHOICES

# Related ids are plain numbers (IdFilter), not model choices: an id the user cannot see must look
# exactly like one that does not exist (an empty result), never like a "valid choice".


class PatientFilter(FilterSet):
    care_team = IdFilter(field_name="care_team_id", label="Care team id")

    class Meta:
        model = Patient
        fields = ["care_team", "sex", "fitzpatrick_skin_type"]


class LesionFilter(FilterSet):
    patient = IdFilter(field_name="patient_id", label="Patient id")
    anatomic_site = ChoiceFilter(choices=ANATOMIC_SITE_CHOICES)
    anatomic_region = django_filters.CharFilter(
        field_name="anatomic_site", lookup_expr="startswith", label="Top level of the anatomic site, e.g. Trunk"
    )

    class Meta:
        model = Lesion
        fields = ["patient", "anatomic_site", "anatomic_region", "diagnosis"]


class LesionImageFilter(FilterSet):
    lesion = IdFilter(field_name="lesion_id", label="Lesion id")
    patient = IdFilter(field_name="lesion__patient_id", label="Patient id")
    acquired_on = django_filters.DateFromToRangeFilter(
        label="Acquisition date range: acquired_on_after / acquired_on_before (inclusive)"
    )

    class Meta:
        model = LesionImage
        fields = ["lesion", "patient", "image_type", "acquired_on"]
