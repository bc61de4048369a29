"""Django admin for care teams, patients, lesions and images.

Image files are read-only here: the admin cannot add or replace an image file, because every upload
must pass the one validation path (patients.uploads via services.upload_images). Admins upload on
the lesion page (staff see every patient); the admin links there. Image metadata (type, date) can be
corrected and images deleted (the stored files go with the row). Thumbnails are shown through the
protected media view, never a public URL. Audit log entries are listed by django-auditlog's own admin.

Every change and deletion goes through the same services as the pages and the API
(``patients.services``), so the admin checks the same rules, writes the same audit entries and
queues the same re-scoring (a lesion's site, an image's date, a deleted image change the
patient's context). A lesion cannot be moved to another patient (the API refuses it too).
"""
from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html

from . import services
from .models import CareTeam, Lesion, LesionImage, LesionReview, Patient
from .uploads import human_size

IMAGE_READONLY = ["preview", "lesion", "sha256", "upload_sha256", "width", "height", "dimensions", "size",
                  "size_bytes", "format", "original_format", "uploaded_by", "uploaded_at"]


def _thumbnail_tag(image, size=96):
    if not image or not image.pk or not image.thumbnail:
        return "—"
    try:
        url = reverse("patients:image_thumbnail", args=[image.pk])
    except NoReverseMatch:
        return "—"
    # Sized by a class of static/css/admin.css (sizes 48, 96, 256): no inline style under the CSP.
    return format_html('<img src="{}" alt="Thumbnail of image {}" loading="lazy" class="admin-thumb admin-thumb-{}">',
                       url, image.pk, size)


def _lesion_page_link(lesion):
    try:
        url = reverse("patients:lesion_detail", args=[lesion.pk])
    except NoReverseMatch:
        return "the lesion page"
    return format_html('<a href="{}">the lesion page</a>', url)


def _changes(form, fields) -> dict:
    """The changed fields of a bound model form, as the services take them."""
    return {name: form.cleaned_data[name] for name in form.changed_data if name in fields}


class _ServiceChecks(forms.ModelForm):
    """Runs, at validation time, the checks the services make beyond the model's own, so the admin
    shows them as form errors (not as a server error at save time)."""

    def clean(self):
        cleaned = super().clean()
        try:
            self.service_checks(cleaned)
        except ValidationError as exc:
            raise ValidationError(exc.message_dict if hasattr(exc, "error_dict") else exc.messages) from None
        return cleaned

    def service_checks(self, cleaned):
        pass


class PatientAdminForm(_ServiceChecks):
    def service_checks(self, cleaned):
        services._check_birth_date(cleaned.get("birth_date"))


class LesionAdminForm(_ServiceChecks):
    def service_checks(self, cleaned):
        if "body_map_x" in self.fields and "body_map_y" in self.fields:
            services._check_body_map(cleaned.get("body_map_x"), cleaned.get("body_map_y"))


class ImageAdminForm(_ServiceChecks):
    def service_checks(self, cleaned):
        day = cleaned.get("acquired_on")
        if day is not None and day > timezone.localdate():
            raise ValidationError({"acquired_on": "The acquisition date cannot be in the future."})


class ServiceInlinesMixin:
    """Inline lesions and images are saved and deleted through the services, one by one."""

    def save_formset(self, request, form, formset, change):
        formset.save(commit=False)  # fills new/changed/deleted_objects; writes nothing
        user = request.user
        for obj in formset.deleted_objects:
            if isinstance(obj, Lesion):
                services.delete_lesion(user=user, lesion=obj)
            elif isinstance(obj, LesionImage):
                services.delete_image(user=user, image=obj)
        for obj, changed in formset.changed_objects:
            if isinstance(obj, Lesion):
                services.update_lesion(user=user, lesion=obj,
                                       data={k: getattr(obj, k) for k in changed if k in services.LESION_FIELDS})
            elif isinstance(obj, LesionImage):
                services.update_image(user=user, image=obj,
                                      data={k: getattr(obj, k) for k in changed if k in services.IMAGE_FIELDS})
        for obj in formset.new_objects:
            if isinstance(obj, Lesion):
                new = services.create_lesion(user=user, patient=obj.patient, **{
                    k: getattr(obj, k) for k in services.LESION_FIELDS})
                obj.pk = new.pk
        formset.save_m2m()


class VisibleRecordsMixin:
    """Admin lists go through the same visibility rule (staff see every patient, so: all records)."""

    patient_lookup = None  # path from the model to its patient, e.g. "lesion__patient"

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        visible = Patient.objects.visible_to(request.user)
        if self.patient_lookup is None:
            return qs.filter(pk__in=visible.values("pk"))
        return qs.filter(**{f"{self.patient_lookup}__in": visible.values("pk")})


@admin.register(CareTeam)
class CareTeamAdmin(admin.ModelAdmin):
    list_display = ["name", "member_count", "patient_count", "created_at"]
    search_fields = ["name", "members__username", "members__last_name"]
    filter_horizontal = ["members"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            _members=Count("members", distinct=True), _patients=Count("patients", distinct=True))

    @admin.display(description="members", ordering="_members")
    def member_count(self, obj):
        return obj._members

    @admin.display(description="patients", ordering="_patients")
    def patient_count(self, obj):
        return obj._patients


class LesionInline(admin.TabularInline):
    model = Lesion
    extra = 0
    fields = ["label", "anatomic_site", "diagnosis", "image_count"]
    readonly_fields = ["image_count"]
    show_change_link = True

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_images=Count("images"))

    @admin.display(description="images")
    def image_count(self, obj):
        return getattr(obj, "_images", None) if obj.pk else "—"


@admin.register(Patient)
class PatientAdmin(ServiceInlinesMixin, VisibleRecordsMixin, admin.ModelAdmin):
    list_display = ["mrn", "name", "birth_date", "sex", "fitzpatrick_skin_type", "care_team", "last_activity_at"]
    list_filter = ["sex", "care_team", "fitzpatrick_skin_type"]
    search_fields = ["mrn", "name"]
    list_select_related = ["care_team"]
    readonly_fields = ["created_at", "updated_at", "last_activity_at"]
    date_hierarchy = "last_activity_at"
    inlines = [LesionInline]
    form = PatientAdminForm

    def save_model(self, request, obj, form, change):
        if change:
            services.update_patient(user=request.user, patient=obj, data=_changes(form, services.PATIENT_FIELDS))
        else:
            new = services.create_patient(user=request.user, **{
                k: form.cleaned_data.get(k) for k in services.PATIENT_FIELDS})
            obj.pk, obj.last_activity_at = new.pk, new.last_activity_at

    def delete_model(self, request, obj):
        services.delete_patient(user=request.user, patient=obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            services.delete_patient(user=request.user, patient=obj)


class LesionImageInline(admin.TabularInline):
    model = LesionImage
    form = ImageAdminForm
    extra = 0
    fields = ["preview", "image_type", "acquired_on", "dimensions", "size", "format", "sha256", "uploaded_by",
              "uploaded_at"]
    readonly_fields = ["preview", "dimensions", "size", "format", "sha256", "uploaded_by", "uploaded_at"]
    show_change_link = True
    ordering = ["acquired_on", "uploaded_at", "id"]

    def has_add_permission(self, request, obj=None):
        return False  # uploads go through the validated upload path on the lesion page

    @admin.display(description="preview")
    def preview(self, obj):
        return _thumbnail_tag(obj)

    @admin.display(description="dimensions")
    def dimensions(self, obj):
        return f"{obj.width} × {obj.height}"

    @admin.display(description="size")
    def size(self, obj):
        return human_size(obj.size_bytes)


@admin.register(Lesion)
class LesionAdmin(ServiceInlinesMixin, VisibleRecordsMixin, admin.ModelAdmin):
    patient_lookup = "patient"
    list_display = ["label", "patient", "anatomic_site", "diagnosis", "image_count", "updated_at"]
    list_filter = ["anatomic_site", "diagnosis"]
    search_fields = ["label", "notes", "patient__mrn", "patient__name"]
    list_select_related = ["patient"]
    autocomplete_fields = ["patient"]
    readonly_fields = ["upload_hint", "created_at", "updated_at"]
    inlines = [LesionImageInline]
    form = LesionAdminForm

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(_images=Count("images"))

    def get_readonly_fields(self, request, obj=None):
        # A lesion stays with its patient (the API refuses a move too): chosen once, when it is added.
        fields = list(super().get_readonly_fields(request, obj))
        return ["patient", *fields] if obj is not None else fields

    def save_model(self, request, obj, form, change):
        if change:
            services.update_lesion(user=request.user, lesion=obj, data=_changes(form, services.LESION_FIELDS))
        else:
            new = services.create_lesion(user=request.user, patient=form.cleaned_data["patient"], **{
                k: form.cleaned_data.get(k) for k in services.LESION_FIELDS})
            obj.pk = new.pk

    def delete_model(self, request, obj):
        services.delete_lesion(user=request.user, lesion=obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            services.delete_lesion(user=request.user, lesion=obj)

    @admin.display(description="images", ordering="_images")
    def image_count(self, obj):
        return obj._images

    @admin.display(description="uploading images")
    def upload_hint(self, obj):
        if not obj or not obj.pk:
            return "Save the lesion first; then upload its images on the lesion page."
        return format_html("Images are uploaded (and validated) on {}.", _lesion_page_link(obj))


@admin.register(LesionImage)
class LesionImageAdmin(VisibleRecordsMixin, admin.ModelAdmin):
    patient_lookup = "lesion__patient"
    list_display = ["id", "preview_small", "lesion", "patient", "image_type", "acquired_on", "format", "dimensions",
                    "size", "uploaded_by", "uploaded_at"]
    list_filter = ["image_type", "acquired_on", "format"]
    search_fields = ["sha256", "upload_sha256", "lesion__label", "lesion__patient__mrn", "lesion__patient__name"]
    list_select_related = ["lesion__patient", "uploaded_by"]
    date_hierarchy = "acquired_on"
    fields = ["preview", "lesion", "image_type", "acquired_on", "dimensions", "size", "size_bytes", "format",
              "original_format", "sha256", "upload_sha256", "uploaded_by", "uploaded_at", "upload_hint"]
    readonly_fields = [*IMAGE_READONLY, "upload_hint"]
    form = ImageAdminForm

    def has_add_permission(self, request):
        return False  # uploads go through the validated upload path on the lesion page

    def save_model(self, request, obj, form, change):
        services.update_image(user=request.user, image=obj, data=_changes(form, services.IMAGE_FIELDS))

    def delete_model(self, request, obj):
        services.delete_image(user=request.user, image=obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            services.delete_image(user=request.user, image=obj)

    @admin.display(description="preview")
    def preview(self, obj):
        return _thumbnail_tag(obj, size=256)

    @admin.display(description="preview")
    def preview_small(self, obj):
        return _thumbnail_tag(obj, size=48)

    @admin.display(description="patient", ordering="lesion__patient__mrn")
    def patient(self, obj):
        return obj.lesion.patient

    @admin.display(description="dimensions")
    def dimensions(self, obj):
        return f"{obj.width} × {obj.height}"

    @admin.display(description="size", ordering="size_bytes")
    def size(self, obj):
        return human_size(obj.size_bytes)

    @admin.display(description="uploading images")
    def upload_hint(self, obj):
        if not obj or not obj.pk:
            return ""
        return format_html("The file cannot be changed here. Upload new images on {}.",
                           _lesion_page_link(obj.lesion))


class LesionReviewInline(admin.TabularInline):
    """A lesion's review history, read-only: reviews are recorded on the lesion page or the API."""

    model = LesionReview
    fk_name = "lesion"
    extra = 0
    fields = ["created_at", "reviewed_by", "decision", "follow_up_months", "follow_up_due", "note", "in_force"]
    readonly_fields = fields
    ordering = ["-created_at", "-id"]
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="in force", boolean=True)
    def in_force(self, obj):
        return obj.is_current


LesionAdmin.inlines = [LesionImageInline, LesionReviewInline]


@admin.register(LesionReview)
class LesionReviewAdmin(VisibleRecordsMixin, admin.ModelAdmin):
    """Read-only history of review decisions (append-only records; a later review supersedes)."""

    patient_lookup = "lesion__patient"
    list_display = ["created_at", "lesion", "patient", "decision", "follow_up_due", "reviewed_by", "in_force"]
    list_filter = ["decision", "follow_up_due", "created_at"]
    search_fields = ["lesion__label", "lesion__patient__mrn", "lesion__patient__name", "note"]
    list_select_related = ["lesion__patient", "reviewed_by", "superseded_by"]
    date_hierarchy = "created_at"
    fields = ["lesion", "decision", "note", "follow_up_months", "follow_up_due", "result_snapshot", "reviewed_by",
              "created_at", "supersedes", "superseded_by_link"]
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="patient", ordering="lesion__patient__mrn")
    def patient(self, obj):
        return obj.lesion.patient

    @admin.display(description="in force", boolean=True)
    def in_force(self, obj):
        return obj.is_current

    @admin.display(description="superseded by")
    def superseded_by_link(self, obj):
        try:
            later = obj.superseded_by
        except LesionReview.DoesNotExist:
            return "— (in force)"
        return format_html('<a href="{}">{}</a>', reverse("admin:patients_lesionreview_change", args=[later.pk]),
                           later)
