"""Clinician pages: worklist, patient, lesion, uploads.

Every object is looked up through ``Patient.objects.visible_to(request.user)``, so a patient of
another care team answers 404 on every URL. The views validate input with forms and leave the work
(and its audit trail) to the services in patients.services.
"""
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, Prefetch, Q
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.module_loading import import_string
from django.views.decorators.http import require_http_methods


from . import services
from .forms import ImageUploadForm, LesionForm, PatientCreateForm, PatientForm, add_service_errors
from .models import Lesion, LesionImage, Patient
from .uploads import UploadRejected

WORKLIST_PAGE_SIZE = 25
NO_PERMISSION = "You are not allowed to do this for this patient."


# --- look-ups: the only way these views reach an object ------------------------------------------

def visible_patients(user):
    return Patient.objects.visible_to(user)


def save_changes(request, form, update, *, saved: str) -> bool:
    """Hand a valid edit form's changed fields to ``update(data)`` (a service call). True when it
    worked (a success message is queued); service refusals become form errors and False."""
    data = {name: form.cleaned_data[name] for name in form.changed_data}
    try:
        if data:
            update(data)
    except ValidationError as e:
        add_service_errors(form, e)
        return False
    except PermissionDenied as e:
        form.add_error(None, str(e) or NO_PERMISSION)
        return False
    messages.success(request, saved if data else "Nothing changed.")
    return True


def get_patient(request, pk):
    return get_object_or_404(visible_patients(request.user).select_related("care_team"), pk=pk)


def get_lesion(request, pk):
    lesions = Lesion.objects.filter(patient__in=visible_patients(request.user))
    return get_object_or_404(lesions.select_related("patient", "patient__care_team"), pk=pk)


def images_in_date_order():
    """A lesion's images, oldest first, with what other apps show beside each image (the analysis
    results) prefetched in one query each: settings.IMAGE_LIST_PREFETCHES names them, so the
    records core does not import those apps."""
    extras = [import_string(path)() for path in settings.IMAGE_LIST_PREFETCHES]
    return LesionImage.objects.order_by("acquired_on", "uploaded_at", "id").select_related(
        "uploaded_by").prefetch_related(*extras)


# --- worklist ------------------------------------------------------------------------------------

@login_required
def worklist(request):
    q = request.GET.get("q", "").strip()
    patients = visible_patients(request.user).annotate(
        n_lesions=Count("lesions", distinct=True),
        n_images=Count("lesions__images", distinct=True),
    )
    if q:
        patients = patients.filter(Q(mrn__icontains=q) | Q(name__icontains=q))
    patients = patients.order_by("-last_activity_at", "-pk")
    page = Paginator(patients, WORKLIST_PAGE_SIZE).get_page(request.GET.get("page"))
    today = timezone.localdate()
    for p in page:
        p.age = p.age_on(today)
    return render(request, "patients/worklist.html", {
        "page": page,
        "q": q,
        "has_any": page.paginator.count > 0 or visible_patients(request.user).exists(),
    })


# --- patients ------------------------------------------------------------------------------------

def _lesion_groups(lesions):
    """Lesions grouped by anatomic region, then by site within the region (unrecorded site last)."""
    regions: dict[str, dict[str, list]] = {}
    for lesion in sorted(lesions, key=lambda l: (l.anatomic_site == "", l.anatomic_site.split(":"),
                                                 l.label.lower(), l.pk)):
        region = lesion.anatomic_region or "Site not recorded"
        _, _, rest = lesion.anatomic_site.partition(":")
        if not lesion.anatomic_site:
            site = ""
        else:
            site = rest.replace(":", " › ") if rest else "Not further specified"
        regions.setdefault(region, {}).setdefault(site, []).append(lesion)
    return [
        {"region": region, "sites": [{"site": s, "lesions": ls} for s, ls in sites.items()],
         "count": sum(len(ls) for ls in sites.values())}
        for region, sites in regions.items()
    ]


@login_required
def patient_detail(request, pk):
    patient = get_patient(request, pk)
    services.record_access(user=request.user, obj=patient)
    lesions = list(patient.lesions.prefetch_related(Prefetch("images", queryset=images_in_date_order())))
    n_images = sum(len(lesion.images.all()) for lesion in lesions)
    return render(request, "patients/patient_detail.html", {
        "patient": patient,
        "age": patient.age_on(timezone.localdate()),
        "lesion_groups": _lesion_groups(lesions),
        "n_lesions": len(lesions),
        "n_images": n_images,
    })


@login_required
@require_http_methods(["GET", "POST"])
def patient_create(request):
    form = PatientCreateForm(request.POST or None, user=request.user)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            patient = services.create_patient(
                user=request.user, mrn=data["mrn"], name=data["name"], birth_date=data["birth_date"],
                sex=data["sex"], fitzpatrick_skin_type=data["fitzpatrick_skin_type"],
                care_team=data["care_team"],
            )
        except ValidationError as e:
            add_service_errors(form, e)
        except PermissionDenied as e:
            form.add_error(None, str(e) or NO_PERMISSION)
        else:
            messages.success(request, f"Patient {patient.name} ({patient.mrn}) created.")
            return redirect("patients:patient_detail", pk=patient.pk)
    return render(request, "patients/patient_form.html", {
        "form": form, "title": "New patient", "submit": "Create patient",
        "cancel_url": reverse("patients:worklist"),
        "no_team": not form.fields["care_team"].queryset.exists(),
    })


@login_required
@require_http_methods(["GET", "POST"])
def patient_edit(request, pk):
    patient = get_patient(request, pk)
    form = PatientForm(request.POST or None, instance=get_patient(request, pk), user=request.user)
    if request.method == "POST" and form.is_valid() and save_changes(
            request, form, lambda data: services.update_patient(user=request.user, patient=patient, data=data),
            saved="Patient details saved."):
        return redirect("patients:patient_detail", pk=patient.pk)
    return render(request, "patients/patient_form.html", {
        "form": form, "patient": patient, "title": f"Edit {patient.name}", "submit": "Save changes",
        "cancel_url": reverse("patients:patient_detail", args=[patient.pk]),
    })


# --- lesions -------------------------------------------------------------------------------------

@login_required
@require_http_methods(["GET", "POST"])
def lesion_create(request, pk):
    patient = get_patient(request, pk)
    form = LesionForm(request.POST or None, instance=Lesion(patient=patient))
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            lesion = services.create_lesion(
                user=request.user, patient=patient, label=data["label"],
                anatomic_site=data["anatomic_site"], notes=data["notes"], diagnosis=data["diagnosis"],
                body_map_x=data["body_map_x"], body_map_y=data["body_map_y"],
            )
        except ValidationError as e:
            add_service_errors(form, e)
        except PermissionDenied as e:
            form.add_error(None, str(e) or NO_PERMISSION)
        else:
            messages.success(request, f"Lesion {lesion.label} added. Upload its images below.")
            return redirect("patients:lesion_detail", pk=lesion.pk)
    return render(request, "patients/lesion_form.html", {
        "form": form, "patient": patient, "title": "New lesion", "submit": "Add lesion",
        "cancel_url": reverse("patients:patient_detail", args=[patient.pk]),
    })


def _render_lesion(request, lesion, upload_form=None):
    images = list(images_in_date_order().filter(lesion=lesion))
    timeline: dict = {}
    for image in images:
        timeline.setdefault(image.acquired_on, []).append(image)
    return render(request, "patients/lesion_detail.html", {
        "lesion": lesion,
        "patient": lesion.patient,
        "age": lesion.patient.age_on(timezone.localdate()),
        "images": images,
        "timeline": list(timeline.items()),
        "upload_form": upload_form or ImageUploadForm(),
        "max_files": settings.UPLOAD_MAX_FILES,
    })


@login_required
def lesion_detail(request, pk):
    lesion = get_lesion(request, pk)
    services.record_access(user=request.user, obj=lesion)
    return _render_lesion(request, lesion)


@login_required
@require_http_methods(["GET", "POST"])
def lesion_edit(request, pk):
    lesion = get_lesion(request, pk)
    form = LesionForm(request.POST or None, instance=get_lesion(request, pk))
    if request.method == "POST" and form.is_valid() and save_changes(
            request, form, lambda data: services.update_lesion(user=request.user, lesion=lesion, data=data),
            saved="Lesion saved."):
        return redirect("patients:lesion_detail", pk=lesion.pk)
    return render(request, "patients/lesion_form.html", {
        "form": form, "patient": lesion.patient, "lesion": lesion, "title": f"Edit lesion {lesion.label}",
        "submit": "Save changes", "cancel_url": reverse("patients:lesion_detail", args=[lesion.pk]),
    })


# --- uploads -------------------------------------------------------------------------------------

def _upload_message(outcomes) -> str:
    new = sum(1 for o in outcomes if o.created)
    old = len(outcomes) - new
    parts = []
    if new:
        parts.append(f"{new} image{'s' if new != 1 else ''} uploaded")
    if old:
        parts.append(f"{old} already stored")
    return "; ".join(parts) + "."


@login_required
@require_http_methods(["GET", "POST"])
def image_upload(request, pk):
    lesion = get_lesion(request, pk)
    if request.method != "POST":
        return redirect("patients:lesion_detail", pk=lesion.pk)
    form = ImageUploadForm(request.POST, request.FILES)
    if form.is_valid():
        data = form.cleaned_data
        try:
            outcomes = services.upload_images(
                user=request.user, lesion=lesion, files=data["files"],
                image_type=data["image_type"], acquired_on=data["acquired_on"],
            )
        except UploadRejected as e:
            # Per file: {client file name: [reasons]}; or one plain message for the whole batch.
            per_file = e.message_dict.items() if hasattr(e, "error_dict") else [(None, e.messages)]
            for name, reasons in per_file:
                for reason in reasons:
                    form.add_error("files", reason if name in (NON_FIELD_ERRORS, None, "") else f"{name}: {reason}")
            form.add_error(None, "Nothing was stored: fix or remove the files below and upload again.")
        except ValidationError as e:
            add_service_errors(form, e)
        except PermissionDenied as e:
            form.add_error(None, str(e) or NO_PERMISSION)
        else:
            messages.success(request, _upload_message(outcomes))
            return redirect(reverse("patients:lesion_detail", args=[lesion.pk]) + "#images")
    return _render_lesion(request, lesion, upload_form=form)
