"""Forms of the clinician pages. They validate input; the services in patients.services do the work."""
import datetime

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone

from .models import CareTeam, Lesion, LesionImage, LesionReview, Patient
from .vocabulary import ANATOMIC_SITE_CHOICES, DIAGNOSIS_CHOICES


class DateInput(forms.DateInput):
    """A native date picker (<input type=date>), which always submits ISO dates."""

    input_type = "date"

    def __init__(self, attrs=None):
        super().__init__(attrs=attrs, format="%Y-%m-%d")


def add_service_errors(form, error):
    """Show a service's ValidationError on the form: on its field when the form has it, else on top."""
    if hasattr(error, "error_dict"):
        for field, errors in error.error_dict.items():
            target = field if field in form.fields else None
            for e in errors:
                messages = e.messages
                if target is None and field not in (None, "__all__"):
                    label = field.replace("_", " ").capitalize()
                    messages = [f"{label}: {m}" for m in messages]
                for m in messages:
                    form.add_error(target, m)
    else:
        for m in getattr(error, "messages", [str(error)]):
            form.add_error(None, m)


class PatientForm(forms.ModelForm):
    class Meta:
        model = Patient
        fields = ["mrn", "name", "birth_date", "sex", "fitzpatrick_skin_type"]
        labels = {
            "mrn": "Medical record number",
            "name": "Full name",
            "birth_date": "Date of birth",
            "fitzpatrick_skin_type": "Skin type (Fitzpatrick)",
        }
        help_texts = {
            "mrn": "The hospital's record number; unique across the system.",
            "fitzpatrick_skin_type": "From I (always burns, never tans) to VI (never burns).",
        }
        widgets = {
            "birth_date": DateInput(),
            "mrn": forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}),
            "name": forms.TextInput(attrs={"autocomplete": "off"}),
        }

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.user = user
        self.fields["fitzpatrick_skin_type"].choices = [("", "Not recorded")] + [
            c for c in self.fields["fitzpatrick_skin_type"].choices if c[0]
        ]

    def clean_birth_date(self):
        born = self.cleaned_data["birth_date"]
        if born and born > timezone.localdate():
            raise ValidationError("The date of birth cannot be in the future.")
        if born and born < datetime.date(1900, 1, 1):
            raise ValidationError("Please check the year of birth.")
        return born


class PatientCreateForm(PatientForm):
    care_team = forms.ModelChoiceField(
        queryset=CareTeam.objects.none(),
        label="Care team",
        help_text="The clinicians of this team will see and manage the patient.",
        empty_label=None,
    )

    class Meta(PatientForm.Meta):
        pass

    def __init__(self, *args, user=None, **kwargs):
        super().__init__(*args, user=user, **kwargs)
        if user is not None and user.is_staff:
            teams = CareTeam.objects.all()
        elif user is not None:
            teams = CareTeam.objects.filter(members=user)
        else:
            teams = CareTeam.objects.none()
        self.fields["care_team"].queryset = teams
        if teams.count() != 1:
            self.fields["care_team"].empty_label = "Choose a care team"
        else:
            self.fields["care_team"].initial = teams.first().pk
        # Show the care team right after the identity fields.
        self.order_fields(["mrn", "name", "birth_date", "sex", "fitzpatrick_skin_type", "care_team"])


def grouped_choices(flat, empty_label):
    """ISIC hierarchical values grouped under their top level, in tree order, for <optgroup>s."""
    groups: dict[str, list] = {}
    for value, _label in sorted((c for c in flat if c[0]), key=lambda c: c[0].split(":")):
        top, _, rest = value.partition(":")
        # The full path: a closed <select> shows the option, not its group.
        label = value.replace(":", " › ") if rest else f"{top} (not further specified)"
        groups.setdefault(top, []).append((value, label))
    return [("", empty_label)] + list(groups.items())


class LesionForm(forms.ModelForm):
    class Meta:
        model = Lesion
        fields = ["label", "anatomic_site", "body_map_x", "body_map_y", "notes", "diagnosis"]
        labels = {
            "label": "Label",
            "anatomic_site": "Anatomic site",
            "body_map_x": "Across (x)",
            "body_map_y": "Down (y)",
            "notes": "Clinical notes",
            "diagnosis": "Final diagnosis",
        }
        help_texts = {
            "label": "A short name you will recognise, e.g. “L1 left shoulder”.",
            "anatomic_site": "ISIC anatomic site vocabulary.",
            "body_map_x": "Fraction of the body map's width: 0 is the left edge, 1 the right edge.",
            "body_map_y": "Fraction of the body map's height: 0 is the top, 1 the bottom.",
            "diagnosis": "Histopathology or final clinical diagnosis, when known (ISIC vocabulary).",
        }
        widgets = {
            "body_map_x": forms.NumberInput(attrs={"min": 0, "max": 1, "step": "any", "inputmode": "decimal"}),
            "body_map_y": forms.NumberInput(attrs={"min": 0, "max": 1, "step": "any", "inputmode": "decimal"}),
            "notes": forms.Textarea(attrs={"rows": 5}),
            "label": forms.TextInput(attrs={"autocomplete": "off"}),
            # Long vocabularies (about 200 sites, 400 diagnoses): pickers.js adds a search box.
            "anatomic_site": forms.Select(attrs={"data-searchable": "sites"}),
            "diagnosis": forms.Select(attrs={"data-searchable": "diagnoses"}),
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["anatomic_site"].choices = grouped_choices(ANATOMIC_SITE_CHOICES, "Not recorded")
        self.fields["diagnosis"].choices = grouped_choices(DIAGNOSIS_CHOICES, "Not known yet")

    def clean(self):
        cleaned = super().clean()
        for name in ("body_map_x", "body_map_y"):
            value = cleaned.get(name)
            if value is not None and not 0 <= value <= 1:
                self.add_error(name, "Enter a value between 0 and 1.")
        if (cleaned.get("body_map_x") is None) != (cleaned.get("body_map_y") is None):
            self.add_error("body_map_y" if cleaned.get("body_map_y") is None else "body_map_x",
                           "Give both x and y, or neither.")
        return cleaned


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """One or several files from one <input type=file multiple>."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        # Empty files go on to the upload service, which refuses them by name with the others.
        kwargs.setdefault("allow_empty_file", True)
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        items = [d for d in (data if isinstance(data, (list, tuple)) else [data]) if d]
        if not items:
            if self.required:
                raise ValidationError(self.error_messages["required"], code="required")
            return []
        return [super(MultipleFileField, self).clean(d, initial) for d in items]


class ImageUploadForm(forms.Form):
    files = MultipleFileField(
        label="Images",
        help_text="One or several JPEG, PNG, TIFF or BMP images of this lesion.",
        widget=MultipleFileInput(
            attrs={"accept": "image/jpeg,image/png,image/tiff,image/bmp,.jpg,.jpeg,.png,.tif,.tiff,.bmp"}
        ),
        error_messages={"required": "Choose at least one image."},
    )
    image_type = forms.ChoiceField(
        label="Image type", choices=LesionImage.ImageType.choices, initial=LesionImage.ImageType.DERMOSCOPIC
    )
    acquired_on = forms.DateField(
        label="Acquisition date",
        help_text="The day the images were taken (applies to all files of this upload).",
        widget=DateInput(),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["acquired_on"].initial = timezone.localdate()

    def clean_files(self):
        files = self.cleaned_data["files"]
        limit = getattr(settings, "UPLOAD_MAX_FILES", 20)
        if len(files) > limit:
            raise ValidationError(f"At most {limit} images per upload; you chose {len(files)}.")
        return files

    def clean_acquired_on(self):
        day = self.cleaned_data["acquired_on"]
        if day and day > timezone.localdate():
            raise ValidationError("The acquisition date cannot be in the future.")
        return day


FOLLOW_UP_CHOICES = [("", "No follow-up"), ("1", "1 month"), ("3", "3 months"), ("6", "6 months"),
                     ("12", "12 months"), ("24", "24 months")]


class ReviewForm(forms.Form):
    decision = forms.ChoiceField(label="Decision", choices=LesionReview.Decision.choices,
                                 initial=LesionReview.Decision.ACKNOWLEDGED)
    note = forms.CharField(label="Note", required=False, max_length=5000,
                           widget=forms.Textarea(attrs={"rows": 3}))
    follow_up_months = forms.TypedChoiceField(
        label="Follow-up", choices=FOLLOW_UP_CHOICES, required=False, coerce=int, empty_value=None,
        help_text="Sets the due date for the follow-up list.")
