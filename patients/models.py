"""Clinical records: care teams, patients, lesions and the images of each lesion over time."""
import logging
import uuid

from django.conf import settings
from django.db import models, transaction
from django.db.models import Q

from .vocabulary import (
    ANATOMIC_SITE_CHOICES,
    DIAGNOSIS_CHOICES,
    FITZPATRICK_CHOICES,
    anatomic_region,
    is_melanoma_diagnosis,
)


class CareTeam(models.Model):
    name = models.CharField(max_length=200, unique=True)
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="care_teams", blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class PatientQuerySet(models.QuerySet):
    def visible_to(self, user):
        """THE visibility rule: every page, endpoint, nested route and media view goes through it.

        Staff see all patients; an active clinician sees the patients of the care teams they are a
        member of; anybody else sees none.
        """
        if user is None or not user.is_authenticated or not user.is_active:
            return self.none()
        if user.is_staff:
            return self.all()
        # A semi-join on the user's teams (no JOIN, so no duplicate rows and no DISTINCT: counts,
        # ordering and pagination stay plain index scans; FOR UPDATE works on it too).
        teams = CareTeam.members.through.objects.filter(user_id=user.pk).values("careteam_id")
        return self.filter(care_team_id__in=teams)


class Patient(models.Model):
    class Sex(models.TextChoices):
        FEMALE = "female", "Female"
        MALE = "male", "Male"
        OTHER = "other", "Other"
        UNKNOWN = "unknown", "Unknown"

    mrn = models.CharField("medical record number", max_length=64, unique=True)
    name = models.CharField(max_length=200)
    birth_date = models.DateField()
    sex = models.CharField(max_length=10, choices=Sex.choices, default=Sex.UNKNOWN)
    fitzpatrick_skin_type = models.CharField(max_length=3, choices=FITZPATRICK_CHOICES, blank=True)
    care_team = models.ForeignKey(CareTeam, on_delete=models.PROTECT, related_name="patients")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Last time anything was added or changed for this patient (worklist ordering).
    last_activity_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = PatientQuerySet.as_manager()

    class Meta:
        ordering = ["-last_activity_at"]

    def __str__(self):
        return f"{self.name} ({self.mrn})"

    def age_on(self, day) -> int:
        b = self.birth_date
        return day.year - b.year - ((day.month, day.day) < (b.month, b.day))


class Lesion(models.Model):
    patient = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="lesions")
    label = models.CharField(max_length=100, help_text="Short name, e.g. 'L1 left shoulder'.")
    anatomic_site = models.CharField(max_length=100, choices=ANATOMIC_SITE_CHOICES, blank=True)
    # Optional position on a body map, as fractions of the map's width and height (0..1).
    body_map_x = models.FloatField(null=True, blank=True)
    body_map_y = models.FloatField(null=True, blank=True)
    notes = models.TextField(blank=True)
    diagnosis = models.CharField(
        "final diagnosis", max_length=255, choices=DIAGNOSIS_CHOICES, blank=True,
        help_text="Histopathology or final clinical diagnosis, when known.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["anatomic_site", "label", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(body_map_x__isnull=True) | (Q(body_map_x__gte=0) & Q(body_map_x__lte=1)))
                & (Q(body_map_y__isnull=True) | (Q(body_map_y__gte=0) & Q(body_map_y__lte=1))),
                name="lesion_body_map_in_unit_square",
            )
        ]

    def __str__(self):
        return f"{self.label} ({self.patient.mrn})"

    @property
    def anatomic_region(self) -> str:
        return anatomic_region(self.anatomic_site)

    @property
    def is_melanoma(self) -> bool | None:
        return is_melanoma_diagnosis(self.diagnosis) if self.diagnosis else None


def _image_path(instance, filename):
    # The stored name is generated; the client's file name is never used.
    return f"images/{uuid.uuid4().hex}.{filename.rsplit('.', 1)[-1]}"


def _thumbnail_path(instance, filename):
    return f"thumbnails/{uuid.uuid4().hex}.jpg"


class LesionImage(models.Model):
    class ImageType(models.TextChoices):
        DERMOSCOPIC = "dermoscopic", "Dermoscopic"
        CLINICAL_CLOSE_UP = "clinical_close_up", "Clinical close-up"
        OVERVIEW = "overview", "Clinical overview"

    lesion = models.ForeignKey(Lesion, on_delete=models.CASCADE, related_name="images")
    file = models.FileField(upload_to=_image_path, max_length=255)
    thumbnail = models.FileField(upload_to=_thumbnail_path, max_length=255)
    sha256 = models.CharField(max_length=64, help_text="SHA-256 of the stored (re-encoded) bytes.")
    upload_sha256 = models.CharField(
        max_length=64, help_text="SHA-256 of the bytes as uploaded (same bytes twice = same image)."
    )
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    size_bytes = models.PositiveIntegerField(help_text="Size of the stored file.")
    format = models.CharField(max_length=10, help_text="Stored format (JPEG or PNG).")
    original_format = models.CharField(max_length=10, help_text="Format the upload was decoded as.")
    image_type = models.CharField(max_length=20, choices=ImageType.choices, default=ImageType.DERMOSCOPIC)
    acquired_on = models.DateField("acquisition date")
    uploaded_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="uploaded_images"
    )
    uploaded_at = models.DateTimeField(auto_now_add=True)
    quality = models.JSONField(
        default=dict, blank=True,
        help_text="Image-quality measurements and warnings from the upload check (empty: not assessed).")

    class Meta:
        ordering = ["acquired_on", "uploaded_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["lesion", "upload_sha256"], name="unique_image_bytes_per_lesion")
        ]

    def __str__(self):
        return f"Image {self.pk} of {self.lesion}"

    @property
    def patient(self):
        return self.lesion.patient


def _remove_stored_files(sender, instance, **kwargs):
    """When an image row is deleted (service, admin, cascade), its files go once the deletion commits."""
    names = [f.name for f in (instance.file, instance.thumbnail) if f and f.name]
    storage = instance.file.storage

    def remove():
        for name in names:
            try:
                storage.delete(name)
            except OSError:  # logged; never undoes or hides the committed deletion
                logging.getLogger(__name__).exception("could not remove %s", name)

    transaction.on_commit(remove)


models.signals.post_delete.connect(
    _remove_stored_files, sender=LesionImage, dispatch_uid="patients.remove_stored_image_files"
)


def add_months(day, months: int):
    """``day`` plus ``months`` calendar months (the 31st becomes the month's last day)."""
    import calendar
    import datetime

    index = day.month - 1 + int(months)
    year, month = day.year + index // 12, index % 12 + 1
    return datetime.date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


class LesionReviewQuerySet(models.QuerySet):
    def current(self):
        """Only the latest review of each lesion (the one in force; older ones are history)."""
        return self.filter(superseded_by__isnull=True)


class LesionReview(models.Model):
    """A clinician's review of a lesion's results: acknowledgement and decision, append-only.

    A review is never edited or deleted through the application: a later review of the same lesion
    supersedes it (``supersedes`` points at the one it replaced), and the history stays. The review
    acknowledges every result of the lesion finished before ``created_at``.
    """

    class Decision(models.TextChoices):
        ACKNOWLEDGED = "acknowledged", "Acknowledged (no change)"
        REASSURE = "reassure", "Reassure"
        MONITOR = "monitor", "Monitor"
        EXCISE = "excise", "Excise"
        REFER = "refer", "Refer"
        OTHER = "other", "Other"

    lesion = models.ForeignKey(Lesion, on_delete=models.CASCADE, related_name="reviews")
    decision = models.CharField(max_length=20, choices=Decision.choices)
    note = models.TextField(blank=True)
    follow_up_months = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="Follow-up interval in months, if a follow-up visit is wanted.")
    follow_up_due = models.DateField(null=True, blank=True, db_index=True,
                                     help_text="Review date plus the follow-up interval.")
    supersedes = models.OneToOneField(
        "self", on_delete=models.RESTRICT, null=True, blank=True, related_name="superseded_by",
        help_text="The previous review of this lesion, which this one replaces.")
    # What the reviewer saw: the lesion's current result when the review was recorded (a snapshot).
    result_snapshot = models.JSONField(default=dict, blank=True)
    reviewed_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT,
                                    related_name="lesion_reviews")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = LesionReviewQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(follow_up_months__isnull=True) & Q(follow_up_due__isnull=True))
                | (Q(follow_up_months__gte=1) & Q(follow_up_months__lte=60) & Q(follow_up_due__isnull=False)),
                name="review_follow_up_interval_and_due_together",
            )
        ]

    def __str__(self):
        return f"{self.get_decision_display()} for {self.lesion} on {self.created_at:%Y-%m-%d}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise ValueError("Lesion reviews are append-only: record a new review instead of editing one.")
        super().save(*args, **kwargs)

    @property
    def is_current(self) -> bool:
        try:
            self.superseded_by  # noqa: B018
        except LesionReview.DoesNotExist:
            return True
        return False


class DataChange(models.Model):
    """One committed change to what the clinical pages show, written by database triggers (never by
    Python): a row of a patient, lesion, image, review or analysis was inserted, updated or deleted
    (``patient_id`` = that patient), or something every page shows changed -- a model version, a
    care team's name (``patient_id`` NULL).

    A patient's *stamp* is its newest row's id (``patients.stamps``): it changes whenever a
    transaction that touched the patient commits, however the change was made (services, the
    worker's bulk updates, the admin, raw SQL). Pages cache what they render under the stamp, so
    nothing is ever invalidated by hand and nothing stale can be served (see ``patients.stamps`` for
    why the ids follow commit order). Old rows are compacted away: only each patient's newest
    one matters.
    """

    id = models.BigAutoField(primary_key=True)
    patient_id = models.BigIntegerField(null=True, help_text="The patient changed; empty: a global change.")
    txid = models.BigIntegerField(null=True, help_text="The writing transaction (one row per patient and "
                                                       "transaction on PostgreSQL).")

    class Meta:
        indexes = [models.Index(fields=["patient_id", "id"], name="datachange_patient_id")]
        constraints = [models.UniqueConstraint(fields=["patient_id", "txid"], name="datachange_once_per_tx")]

    def __str__(self):
        return f"change {self.id} of patient {self.patient_id}"
