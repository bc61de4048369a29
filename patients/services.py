"""Business logic of the clinical records: every create, change and upload goes through here.

All functions are keyword-only and take the acting ``user``. Each one checks that the user may act
on the patient concerned through ``Patient.objects.visible_to(user)`` (the one visibility rule) and
raises ``PermissionDenied`` or ``ValidationError`` (with field errors) otherwise. Every create,
update and upload bumps ``patient.last_activity_at`` (the worklist shows the most recently active
patients first) and records the acting user in the audit trail, also for token-authenticated API
requests (where the audit middleware runs before DRF knows the user).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
from dataclasses import dataclass

from auditlog.models import LogEntry
from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models.signals import pre_save
from django.utils import timezone

from .models import CareTeam, Lesion, LesionImage, LesionReview, Patient, add_months
from .signals import images_stored, patient_records_changed
from .uploads import ProcessedUpload, UploadRejected, process_upload

logger = logging.getLogger(__name__)

PATIENT_FIELDS = ("mrn", "name", "birth_date", "sex", "fitzpatrick_skin_type", "care_team")
LESION_FIELDS = ("label", "anatomic_site", "notes", "diagnosis", "body_map_x", "body_map_y")
NOT_VISIBLE = "You do not have access to this patient."
DUPLICATE_MRN = "A patient with this medical record number already exists."


# --- audit ---------------------------------------------------------------------------------------

_actor: contextvars.ContextVar = contextvars.ContextVar("patients_audit_actor", default=None)


@contextlib.contextmanager
def acting_as(user):
    """Make ``user`` the actor of the audit-log entries written inside the block.

    django-auditlog's middleware takes the actor from ``request.user`` before any view runs; for
    token-authenticated API requests that is still anonymous, so entries would carry no actor.
    Inside this block a pre_save receiver on LogEntry fills in ``user`` where no actor is set.
    """
    actor = user if user is not None and getattr(user, "is_authenticated", False) else None
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def _stamp_actor(sender, instance, **kwargs):
    actor = _actor.get()
    if actor is not None and instance.actor_id is None:
        instance.actor = actor
        instance.actor_email = getattr(actor, "email", None) or None


pre_save.connect(_stamp_actor, sender=LogEntry, dispatch_uid="patients.services.stamp_audit_actor")


def record_access(*, user, obj) -> None:
    """Write a "viewed" (ACCESS) audit entry for ``obj`` (a Patient, Lesion or LesionImage) by ``user``."""
    from auditlog.signals import accessed

    if obj is None or obj.pk is None:
        return
    _check_patient(user=user, patient=_patient_of(obj))
    with acting_as(user):
        accessed.send(sender=obj.__class__, instance=obj)


LIST_QUERY_MAX_PARAMS = 30
LIST_QUERY_MAX_CHARS = 200


def record_list_access(*, user, model, listing: str, query=None, count: int | None = None, shown=(),
                       patients=None) -> LogEntry:
    """Write ONE "viewed" (ACCESS) audit entry for a list or search the user read: which list
    (``listing``, e.g. "worklist" or "api:patient-list"), its query parameters (search text,
    filters, ordering, page), how many records matched (``count``), the ids of the ``model`` rows
    shown and the patients they belong to. The entry names no single object (``object_pk`` empty,
    ``additional_data`` holds the rest). One INSERT per request whatever the number of rows."""
    from django.contrib.contenttypes.models import ContentType

    _check_user(user)
    shown = [int(pk) for pk in shown]
    params: dict = {}
    for key in list(query.keys())[:LIST_QUERY_MAX_PARAMS] if query else []:
        values = query.getlist(key) if hasattr(query, "getlist") else [query[key]]
        values = [str(v)[:LIST_QUERY_MAX_CHARS] for v in values]
        params[str(key)[:LIST_QUERY_MAX_CHARS]] = values[0] if len(values) == 1 else values
    data = {"list": listing, "query": params, "count": count, "shown": shown}
    if patients is not None:
        data["patients"] = sorted({int(pk) for pk in patients if pk is not None})
    search = f", search {params['q']!r}" if params.get("q") else ""
    total = "" if count is None else f" of {count}"
    with acting_as(user):
        return LogEntry.objects.create(
            content_type=ContentType.objects.get_for_model(model), object_pk="", object_id=None,
            object_repr=f"{listing}: {len(shown)}{total} {model._meta.verbose_name_plural} shown{search}"[:1000],
            action=LogEntry.Action.ACCESS, additional_data=data,
        )


# --- checks --------------------------------------------------------------------------------------

def _patient_of(obj) -> Patient:
    if isinstance(obj, Patient):
        return obj
    if isinstance(obj, Lesion):
        return obj.patient
    if isinstance(obj, LesionImage):
        return obj.lesion.patient
    raise TypeError(f"no patient for {type(obj).__name__}")


def _check_user(user) -> None:
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        raise PermissionDenied("You must be signed in.")


def _check_patient(*, user, patient: Patient, lock: bool = False) -> Patient:
    """The patient, re-read through visible_to(user) (locked for update when ``lock``)."""
    _check_user(user)
    if patient is None or patient.pk is None:
        raise ValidationError({"patient": "Choose a patient."})
    if not Patient.objects.visible_to(user).filter(pk=patient.pk).exists():
        raise PermissionDenied(NOT_VISIBLE)
    if lock:
        # visible_to() may use DISTINCT, which cannot be combined with FOR UPDATE: lock by key.
        return Patient.objects.select_for_update().get(pk=patient.pk)
    return patient


def _care_team_for(*, user, care_team) -> CareTeam:
    """The care team a patient goes to: the user's only team by default; only one the user is on."""
    if care_team in (None, ""):
        teams = list(user.care_teams.all()[:2])
        if len(teams) == 1:
            return teams[0]
        if not teams:
            message = ("You are not a member of any care team; ask an administrator to add you to one."
                       if not user.is_staff else "Choose a care team.")
        else:
            message = "You are a member of several care teams; choose one."
        raise ValidationError({"care_team": message})
    not_yours = "You can only choose a care team you are a member of."
    if not isinstance(care_team, CareTeam):
        try:
            care_team = CareTeam.objects.get(pk=int(care_team))
        except (CareTeam.DoesNotExist, TypeError, ValueError):
            # To a clinician an unknown team and another team's id read the same.
            raise ValidationError({"care_team": "Unknown care team." if user.is_staff else not_yours}) from None
    if not user.is_staff and not care_team.members.filter(pk=user.pk).exists():
        raise ValidationError({"care_team": not_yours})
    return care_team


def _unknown_keys(data: dict, allowed) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValidationError({NON_FIELD_ERRORS: [f"These fields cannot be changed here: {', '.join(unknown)}."]})


def _full_clean(obj, *, exclude=None) -> None:
    """Model validation with messages a person can act on."""
    try:
        obj.full_clean(exclude=exclude, validate_unique=True, validate_constraints=True)
    except ValidationError as exc:
        errors = exc.message_dict if hasattr(exc, "error_dict") else {NON_FIELD_ERRORS: exc.messages}
        errors = {k: list(v) for k, v in errors.items()}
        if isinstance(obj, Patient) and "mrn" in errors:
            errors["mrn"] = [DUPLICATE_MRN if "already exists" in m else m for m in errors["mrn"]]
        if isinstance(obj, Lesion) and any("lesion_body_map_in_unit_square" in m
                                           for m in errors.get(NON_FIELD_ERRORS, [])):
            errors[NON_FIELD_ERRORS] = [m for m in errors[NON_FIELD_ERRORS]
                                        if "lesion_body_map_in_unit_square" not in m]
            if not errors[NON_FIELD_ERRORS]:
                del errors[NON_FIELD_ERRORS]
            errors.setdefault("body_map_x", []).append("Body map positions are fractions between 0 and 1.")
        raise ValidationError(errors) from None


def _check_body_map(x, y) -> None:
    errors = {}
    for name, value in (("body_map_x", x), ("body_map_y", y)):
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            errors[name] = "Must be a number between 0 and 1."
            continue
        if not 0.0 <= number <= 1.0:
            errors[name] = "Must be between 0 and 1 (a fraction of the body map's width or height)."
    if (x is None) != (y is None) and not errors:
        errors["body_map_x" if x is None else "body_map_y"] = "Give both body map coordinates or neither."
    if errors:
        raise ValidationError(errors)


def _touch(patient: Patient) -> None:
    now = timezone.now()
    Patient.objects.filter(pk=patient.pk).update(last_activity_at=now)
    patient.last_activity_at = now


# --- patients ------------------------------------------------------------------------------------

@transaction.atomic
def create_patient(*, user, mrn, name, birth_date, sex=Patient.Sex.UNKNOWN, fitzpatrick_skin_type="",
                   care_team=None) -> Patient:
    _check_user(user)
    team = _care_team_for(user=user, care_team=care_team)
    patient = Patient(
        mrn=(mrn or "").strip(), name=(name or "").strip(), birth_date=birth_date,
        sex=sex or Patient.Sex.UNKNOWN, fitzpatrick_skin_type=fitzpatrick_skin_type or "", care_team=team,
    )
    _full_clean(patient)
    _check_birth_date(patient.birth_date)
    with acting_as(user):
        try:
            with transaction.atomic():
                patient.save()
        except IntegrityError:  # a concurrent request took the MRN between the check and the insert
            raise ValidationError({"mrn": DUPLICATE_MRN}) from None
    return patient


def _check_birth_date(birth_date) -> None:
    if isinstance(birth_date, datetime.date) and birth_date > timezone.localdate():
        raise ValidationError({"birth_date": "The birth date cannot be in the future."})


@transaction.atomic
def update_patient(*, user, patient, data: dict) -> Patient:
    _unknown_keys(data, PATIENT_FIELDS)
    locked = _check_patient(user=user, patient=patient, lock=True)
    if "care_team" in data:
        data = {**data, "care_team": _care_team_for(user=user, care_team=data["care_team"])
                if data["care_team"] not in (None, "") else None}
        if data["care_team"] is None:
            raise ValidationError({"care_team": "A patient must belong to a care team."})
    for key, value in data.items():
        if key in ("mrn", "name") and isinstance(value, str):
            value = value.strip()
        if key == "fitzpatrick_skin_type" and value is None:
            value = ""
        setattr(locked, key, value)
    _full_clean(locked)
    _check_birth_date(locked.birth_date)
    locked.last_activity_at = timezone.now()
    with acting_as(user):
        try:
            with transaction.atomic():
                locked.save()
        except IntegrityError:
            raise ValidationError({"mrn": DUPLICATE_MRN}) from None
    patient_records_changed.send(sender=Patient, patient_id=locked.pk)
    _copy_fields(locked, patient)
    return patient


def _copy_fields(source, target) -> None:
    if source is target:
        return
    for field in source._meta.concrete_fields:
        setattr(target, field.attname, getattr(source, field.attname))
    target._state.fields_cache.clear()


# --- lesions -------------------------------------------------------------------------------------

@transaction.atomic
def create_lesion(*, user, patient, label, anatomic_site="", notes="", diagnosis="", body_map_x=None,
                  body_map_y=None) -> Lesion:
    locked = _check_patient(user=user, patient=patient, lock=True)
    _check_body_map(body_map_x, body_map_y)
    lesion = Lesion(
        patient=locked, label=(label or "").strip(), anatomic_site=anatomic_site or "", notes=notes or "",
        diagnosis=diagnosis or "", body_map_x=body_map_x, body_map_y=body_map_y,
    )
    _full_clean(lesion)
    with acting_as(user):
        lesion.save()
        _touch(locked)
    if patient is not locked:
        patient.last_activity_at = locked.last_activity_at
    return lesion


@transaction.atomic
def update_lesion(*, user, lesion, data: dict) -> Lesion:
    _unknown_keys(data, LESION_FIELDS)
    if lesion is None or lesion.pk is None:
        raise ValidationError({"lesion": "Choose a lesion."})
    patient = _check_patient(user=user, patient=lesion.patient, lock=True)
    current = Lesion.objects.select_for_update().get(pk=lesion.pk)
    if current.patient_id != patient.pk:  # moved in the meantime
        raise PermissionDenied(NOT_VISIBLE)
    for key, value in data.items():
        if key in ("anatomic_site", "notes", "diagnosis", "label") and value is None:
            value = ""
        if key == "label" and isinstance(value, str):
            value = value.strip()
        setattr(current, key, value)
    _check_body_map(current.body_map_x, current.body_map_y)
    _full_clean(current)
    with acting_as(user):
        current.save()
        _touch(patient)
    patient_records_changed.send(sender=Lesion, patient_id=patient.pk)
    _copy_fields(current, lesion)
    return lesion


# --- images --------------------------------------------------------------------------------------

@dataclass
class UploadOutcome:
    image: LesionImage
    created: bool


def _client_names(files) -> list[str]:
    """Each file's client name (for messages only), made unique within the batch."""
    names, seen = [], {}
    for i, f in enumerate(files, start=1):
        name = str(getattr(f, "name", "") or f"file {i}").replace("\\", "/").rsplit("/", 1)[-1] or f"file {i}"
        if name in seen:
            seen[name] += 1
            name = f"{name} ({seen[name]})"
        else:
            seen[name] = 1
        names.append(name)
    return names


def _check_upload_fields(*, files, image_type, acquired_on) -> None:
    errors = {}
    if image_type not in LesionImage.ImageType.values:
        errors["image_type"] = f"Choose an image type: {', '.join(LesionImage.ImageType.values)}."
    if not isinstance(acquired_on, datetime.date) or isinstance(acquired_on, datetime.datetime):
        errors["acquired_on"] = "Give the acquisition date (YYYY-MM-DD)."
    elif acquired_on > timezone.localdate():
        errors["acquired_on"] = "The acquisition date cannot be in the future."
    if not files:
        errors["files"] = "Choose at least one image file."
    elif len(files) > settings.UPLOAD_MAX_FILES:
        errors["files"] = f"At most {settings.UPLOAD_MAX_FILES} files at once ({len(files)} given)."
    if errors:
        raise ValidationError(errors)


def upload_images(*, user, lesion, files, image_type, acquired_on) -> list[UploadOutcome]:
    """Validate and store images of a lesion, all or nothing; one outcome per file, in order.

    Every file is validated first (``uploads.process_upload``). If any is refused, nothing is
    stored and ``UploadRejected`` maps each refused file's client name to its reasons. The same
    bytes as an image already stored for this lesion (or earlier in the batch) give that image back
    with ``created=False``. Files written before a database error are removed again.
    """
    files = list(files or [])
    if lesion is None or lesion.pk is None:
        raise ValidationError({"lesion": "Choose a lesion."})
    _check_patient(user=user, patient=lesion.patient)
    _check_upload_fields(files=files, image_type=image_type, acquired_on=acquired_on)

    # Decode and re-encode outside the transaction (slow work holds no locks).
    processed: list[ProcessedUpload] = []
    refused: dict[str, list[str]] = {}
    for name, f in zip(_client_names(files), files):
        try:
            processed.append(process_upload(f))
        except UploadRejected as exc:
            refused[name] = exc.messages
    if refused:
        raise UploadRejected(refused)

    written: list[str] = []
    committed: list[bool] = []
    try:
        outcomes = _store_images(user=user, lesion=lesion, processed=processed, image_type=image_type,
                                 acquired_on=acquired_on, written=written, committed=committed)
    except BaseException:
        # Only the files of a transaction that did not commit: an error after the commit (a
        # post-commit hook) must never take the files of committed images with it.
        if not committed:
            _delete_files(written)
        raise
    return outcomes


@transaction.atomic
def _store_images(*, user, lesion, processed, image_type, acquired_on, written, committed) -> list[UploadOutcome]:
    # First on-commit callback of this transaction: from then on the files belong to committed rows.
    # (Inside an outer transaction that later rolls back they stay behind as orphans, which
    # purge_orphan_media_files removes.)
    transaction.on_commit(lambda: committed.append(True))
    patient = _check_patient(user=user, patient=lesion.patient, lock=True)
    # Lock the lesion: concurrent uploads of the same bytes to it are serialised, not duplicated.
    try:
        lesion_row = Lesion.objects.select_for_update().get(pk=lesion.pk, patient=patient)
    except Lesion.DoesNotExist:
        raise PermissionDenied(NOT_VISIBLE) from None
    existing = {img.upload_sha256: img for img in LesionImage.objects.filter(
        lesion=lesion_row, upload_sha256__in={p.upload_sha256 for p in processed})}
    outcomes: list[UploadOutcome] = []
    new_images: list[LesionImage] = []
    with acting_as(user):
        for p in processed:
            if p.upload_sha256 in existing:
                outcomes.append(UploadOutcome(image=existing[p.upload_sha256], created=False))
                continue
            image = LesionImage(
                lesion=lesion_row, sha256=p.sha256, upload_sha256=p.upload_sha256, width=p.width,
                height=p.height, size_bytes=len(p.content), format=p.format,
                original_format=p.original_format, image_type=image_type, acquired_on=acquired_on,
                uploaded_by=user, quality=p.quality or {},
            )
            # The names are generated by the model's upload_to; the client's name is never used.
            image.file.save(f"image.{p.extension}", ContentFile(p.content), save=False)
            written.append(image.file.name)
            image.thumbnail.save("thumbnail.jpg", ContentFile(p.thumbnail), save=False)
            written.append(image.thumbnail.name)
            image.save()
            existing[p.upload_sha256] = image
            new_images.append(image)
            outcomes.append(UploadOutcome(image=image, created=True))
        if new_images:
            _touch(patient)
            lesion.patient.last_activity_at = patient.last_activity_at
            images_stored.send(sender=LesionImage, images=list(new_images))
    return outcomes


def _delete_files(names) -> None:
    for name in names:
        try:
            default_storage.delete(name)
        except Exception:  # cleanup must not hide the original error
            logger.exception("could not remove %s after a failed upload", name)


IMAGE_FIELDS = ("image_type", "acquired_on")


@transaction.atomic
def update_image(*, user, image: LesionImage, data: dict) -> LesionImage:
    """Correct an image's type or acquisition date (the file itself never changes). The date is part
    of the patient context (age, order of visits): the patient is re-scored after commit."""
    _unknown_keys(data, IMAGE_FIELDS)
    if image is None or image.pk is None:
        raise ValidationError({"image": "Choose an image."})
    patient = _check_patient(user=user, patient=image.lesion.patient, lock=True)
    current = LesionImage.objects.select_for_update().get(pk=image.pk)
    if current.lesion.patient_id != patient.pk:
        raise PermissionDenied(NOT_VISIBLE)
    errors = {}
    if "image_type" in data and data["image_type"] not in LesionImage.ImageType.values:
        errors["image_type"] = f"Choose an image type: {', '.join(LesionImage.ImageType.values)}."
    if "acquired_on" in data:
        day = data["acquired_on"]
        if not isinstance(day, datetime.date) or isinstance(day, datetime.datetime):
            errors["acquired_on"] = "Give the acquisition date (YYYY-MM-DD)."
        elif day > timezone.localdate():
            errors["acquired_on"] = "The acquisition date cannot be in the future."
    if errors:
        raise ValidationError(errors)
    changed = {k: v for k, v in data.items() if getattr(current, k) != v}
    for key, value in changed.items():
        setattr(current, key, value)
    if changed:
        with acting_as(user):
            current.save(update_fields=list(changed))
            _touch(patient)
        if "acquired_on" in changed:
            patient_records_changed.send(sender=LesionImage, patient_id=patient.pk)
    _copy_fields(current, image)
    return image


def delete_image(*, user, image: LesionImage) -> None:
    """Delete an image; its files are removed once the deletion commits (models' post_delete)."""
    with transaction.atomic():
        patient = _check_patient(user=user, patient=image.lesion.patient, lock=True)
        with acting_as(user):
            image.delete()
            _touch(patient)
        patient_records_changed.send(sender=LesionImage, patient_id=patient.pk)


def delete_lesion(*, user, lesion: Lesion) -> None:
    """Delete a lesion with its images (files removed once committed)."""
    with transaction.atomic():
        patient = _check_patient(user=user, patient=lesion.patient, lock=True)
        with acting_as(user):
            lesion.delete()
            _touch(patient)
        patient_records_changed.send(sender=Lesion, patient_id=patient.pk)


def delete_patient(*, user, patient: Patient) -> None:
    """Delete a patient with lesions and images (files removed once committed). Staff only."""
    _check_user(user)
    if not user.is_staff:
        raise PermissionDenied("Only administrators can delete patient records.")
    with transaction.atomic():
        patient = _check_patient(user=user, patient=patient, lock=True)
        with acting_as(user):
            patient.delete()


def orphan_media_files(*, older_than: datetime.timedelta = datetime.timedelta(hours=1)) -> list[str]:
    """Stored media files no row refers to (a crash between file write and commit): in each folder
    of settings.MEDIA_FILE_FIELDS (images, thumbnails, heatmaps), through the storage API (local
    folder or bucket alike).

    Only files older than ``older_than`` are listed, so uploads in flight are never included.
    """
    from django.apps import apps

    cutoff = timezone.now() - older_than
    orphans = []
    for folder, reference in settings.MEDIA_FILE_FIELDS.items():
        model_label, field = reference.rsplit(".", 1)
        model = apps.get_model(model_label)
        referenced = set(model._default_manager.exclude(**{field: ""}).values_list(field, flat=True))
        try:
            _, names = default_storage.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            path = f"{folder}/{name}"
            if path not in referenced and default_storage.get_modified_time(path) < cutoff:
                orphans.append(path)
    return orphans


def purge_orphan_media_files(*, older_than: datetime.timedelta = datetime.timedelta(hours=1)) -> int:
    names = orphan_media_files(older_than=older_than)
    _delete_files(names)
    return len(names)


# --- reviews -------------------------------------------------------------------------------------

FOLLOW_UP_MONTHS_MAX = 60


def _result_snapshot(lesion: Lesion) -> dict:
    """The lesion's current result as the reviewer saw it (from the app named in settings)."""
    from .results import lesion_result_snapshot

    try:
        return lesion_result_snapshot(lesion) or {}
    except Exception:  # noqa: BLE001 -- a snapshot is a courtesy; the review itself must be recorded
        logger.exception("could not take the result snapshot of lesion %s", lesion.pk)
        return {}


@transaction.atomic
def record_review(*, user, lesion, decision, note="", follow_up_months=None) -> LesionReview:
    """Record a clinician's review of a lesion: it acknowledges the lesion's results so far and
    records the decision, a note and an optional follow-up interval (months), which sets the due
    date. Append-only: the lesion's previous review is superseded (kept as history), never changed.
    """
    if lesion is None or lesion.pk is None:
        raise ValidationError({"lesion": "Choose a lesion."})
    patient = _check_patient(user=user, patient=lesion.patient, lock=True)
    errors = {}
    if decision not in LesionReview.Decision.values:
        errors["decision"] = f"Choose a decision: {', '.join(LesionReview.Decision.values)}."
    months = follow_up_months
    if months in ("", None):
        months = None
    else:
        try:
            months = int(months)
        except (TypeError, ValueError):
            months = -1
        if isinstance(follow_up_months, float) and follow_up_months != int(follow_up_months):
            months = -1
        if not 1 <= months <= FOLLOW_UP_MONTHS_MAX:
            errors["follow_up_months"] = f"The follow-up interval is a whole number of months from 1 to {FOLLOW_UP_MONTHS_MAX}."
    note = (note or "").strip()
    if len(note) > 5000:
        errors["note"] = "Keep the note under 5,000 characters."
    if errors:
        raise ValidationError(errors)
    try:
        current_lesion = Lesion.objects.select_for_update().get(pk=lesion.pk, patient=patient)
    except Lesion.DoesNotExist:
        raise PermissionDenied(NOT_VISIBLE) from None
    previous = LesionReview.objects.filter(lesion=current_lesion).current().order_by("-created_at", "-id").first()
    today = timezone.localdate()
    review = LesionReview(
        lesion=current_lesion, decision=decision, note=note, follow_up_months=months,
        follow_up_due=add_months(today, months) if months else None, supersedes=previous,
        result_snapshot=_result_snapshot(current_lesion), reviewed_by=user,
    )
    with acting_as(user):
        review.save()
        _touch(patient)
    return review


# --- reports -------------------------------------------------------------------------------------

def build_report(*, user, patient, lesion=None) -> bytes:
    """The PDF report of a patient (or of one of their lesions), for a user who may see the patient.

    The generation is written to the audit trail (an "accessed" entry on the patient or lesion with
    ``additional_data = {"report": "pdf"}``).
    """
    from .report import render_report

    if lesion is not None:
        patient = lesion.patient
    patient = _check_patient(user=user, patient=patient)
    lesions = [lesion] if lesion is not None else list(patient.lesions.all())
    if lesion is not None and lesion.patient_id != patient.pk:
        raise PermissionDenied(NOT_VISIBLE)
    title = (f"Lesion report: {lesion.label}, {patient.name}" if lesion is not None
             else f"Patient report: {patient.name}")
    pdf = render_report(patient=patient, lesions=lesions, generated_by=user, title=title)
    target = lesion if lesion is not None else patient
    with acting_as(user):
        LogEntry.objects.log_create(
            target, force_log=True, action=LogEntry.Action.ACCESS,
            additional_data={"report": "pdf", "lesions": [l.pk for l in lesions], "bytes": len(pdf)},
        )
    return pdf
