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
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince
from django.utils.module_loading import import_string
from django.views.decorators.http import require_http_methods


from . import bodymap, pagecache, selectors, services, stamps
from .forms import ImageUploadForm, LesionForm, PatientCreateForm, PatientForm, ReviewForm, add_service_errors
from .models import Lesion, LesionImage, LesionReview, Patient
from .results import is_unreviewed, lesion_results
from .uploads import UploadRejected

WORKLIST_PAGE_SIZE = 25
NO_PERMISSION = "You are not allowed to do this for this patient."


# --- look-ups: the only way these views reach an object ------------------------------------------

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
    return get_object_or_404(selectors.visible_patients(request.user), pk=pk)


def get_lesion(request, pk):
    return get_object_or_404(selectors.visible_lesions(request.user).select_related("patient__care_team"), pk=pk)


def images_in_date_order():
    """A lesion's images, oldest first, with what other apps show beside each image (the analysis
    results) prefetched in one query each: settings.IMAGE_LIST_PREFETCHES names them, so the
    records core does not import those apps."""
    extras = [import_string(path)() for path in settings.IMAGE_LIST_PREFETCHES]
    return LesionImage.objects.order_by("acquired_on", "uploaded_at", "id").select_related(
        "uploaded_by").prefetch_related(*extras)


# --- worklist ------------------------------------------------------------------------------------

def _rendering_context() -> tuple:
    """What rendered dates depend on besides the data: the day (ages), the time zone, the language."""
    return (timezone.localdate(), timezone.get_current_timezone_name(), translation.get_language())


@login_required
def worklist(request):
    q = request.GET.get("q", "").strip()
    patients = selectors.visible_patients(request.user)
    if q:
        patients = patients.filter(Q(mrn__icontains=q) | Q(name__icontains=q))
    patients = stamps.with_stamps(patients.order_by("-last_activity_at", "-pk"))
    page = Paginator(patients, WORKLIST_PAGE_SIZE).get_page(request.GET.get("page"))
    rows = list(page)
    shown = [p.pk for p in rows]
    services.record_list_access(user=request.user, model=Patient, listing="worklist", query=request.GET,
                                count=page.paginator.count, shown=shown, patients=shown)
    # Each row is rendered once per change of its patient (patients.pagecache); the results of
    # the lesions are computed only for the rows that are not cached.
    now, context = timezone.now(), _rendering_context()
    keys = {}
    for p in rows:
        p.ago = timesince(p.last_activity_at, now)
        keys[p.pk] = pagecache.patient_key("worklist-row", p, *context, p.last_activity_at.isoformat(), p.ago)
    html = pagecache.get_many(keys.values())
    missing = [p for p in rows if keys[p.pk] not in html]
    if missing:
        _attach_patient_results(missing)
        fresh = {}
        for p in missing:
            p.age = p.age_on(context[0])
            p.url = reverse("patients:patient_detail", args=[p.pk])
            fresh[keys[p.pk]] = render_to_string("patients/_worklist_row.html", {"p": p})
        pagecache.set_many(fresh)
        html.update(fresh)
    return render(request, "patients/worklist.html", {
        "page": page,
        "rows": [mark_safe(html[keys[p.pk]]) for p in rows],
        "q": q,
        "has_any": page.paginator.count > 0 or selectors.visible_patients(request.user).exists(),
    })


def _attach_patient_results(patients) -> None:
    """Give each patient of a worklist page ``n_lesions``, ``n_images``, ``top_result`` (highest
    current lesion score, naming its model version), ``flagged`` (a lesion currently flagged) and
    ``n_unreviewed`` (lesions with an unreviewed result). A fixed number of queries for the page,
    whatever the number of patients, lesions and images."""
    from django.db.models import Max

    lesions = list(Lesion.objects.filter(patient__in=[p.pk for p in patients])
                   .annotate(last_reviewed_at=Max("reviews__created_at"), n_images=Count("images", distinct=True))
                   .only("pk", "patient_id").order_by())
    results = lesion_results(lesion.pk for lesion in lesions)
    per_patient: dict[int, list] = {}
    for lesion in lesions:
        per_patient.setdefault(lesion.patient_id, []).append(lesion)
    for p in patients:
        mine = per_patient.get(p.pk, [])
        p.n_lesions = len(mine)
        p.n_images = sum(lesion.n_images for lesion in mine)
        scored = [results[lesion.pk] for lesion in mine if lesion.pk in results]
        p.top_result = max(scored, key=lambda r: (r.flagged, r.score)) if scored else None
        p.flagged = any(r.flagged for r in scored)
        p.n_unreviewed = sum(1 for lesion in mine if is_unreviewed(results.get(lesion.pk), lesion.last_reviewed_at))


@login_required
def review_queue(request):
    items = selectors.review_queue(request.user)
    services.record_list_access(user=request.user, model=Lesion, listing="review queue", query=request.GET,
                                count=len(items), shown=[lesion.pk for lesion in items],
                                patients=[lesion.patient_id for lesion in items])
    return render(request, "patients/review_queue.html", {
        "items": items, "n_flagged": sum(1 for lesion in items if lesion.result.flagged),
    })


@login_required
def follow_ups(request):
    try:
        within = max(0, min(365, int(request.GET.get("within", 30))))
    except ValueError:
        within = 30
    today = timezone.localdate()
    reviews = list(selectors.follow_ups_due(request.user, within_days=within, today=today))
    for r in reviews:
        r.overdue_days = (today - r.follow_up_due).days
    services.record_list_access(user=request.user, model=LesionReview, listing="follow-ups", query=request.GET,
                                count=len(reviews), shown=[r.pk for r in reviews],
                                patients=[r.lesion.patient_id for r in reviews])
    return render(request, "patients/follow_ups.html", {
        "reviews": reviews, "within": within, "today": today,
        "n_overdue": sum(1 for r in reviews if r.overdue_days > 0),
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


def _patient_page_context(patient, today) -> dict:
    lesions = list(patient.lesions.prefetch_related(Prefetch("images", queryset=images_in_date_order())))
    n_images = sum(len(lesion.images.all()) for lesion in lesions)
    results = lesion_results(lesion.pk for lesion in lesions)
    dots = [d for d in (bodymap.dot(lesion, results.get(lesion.pk),
                                    url=reverse("patients:lesion_detail", args=[lesion.pk])) for lesion in lesions) if d]
    return {
        "body_map_dots": dots,
        "n_unplaced": len(lesions) - len(dots),
        "patient": patient,
        "age": patient.age_on(today),
        "lesion_groups": _lesion_groups(lesions),
        "n_lesions": len(lesions),
        "n_images": n_images,
    }


@login_required
def patient_detail(request, pk):
    patient = get_object_or_404(stamps.with_stamps(selectors.visible_patients(request.user)), pk=pk)
    services.record_access(user=request.user, obj=patient)
    # The content is the same for every member of the care team until the patient's records (or
    # a model version) change: rendered once per change stamp (patients.pagecache).
    context = _rendering_context()
    key = pagecache.patient_key("patient-page", patient, *context)
    content = pagecache.get_or_build(key, lambda: render_to_string(
        "patients/_patient_detail_content.html", _patient_page_context(patient, context[0])))
    return render(request, "patients/patient_detail.html", {"patient": patient, "content": mark_safe(content)})


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

def _body_map_input(form) -> dict:
    """The clickable body map of the lesion form: its regions and the current position's marker."""
    def number(name):
        value = form[name].value()
        try:
            return None if value in (None, "") else float(value)
        except (TypeError, ValueError):
            return None

    x, y = number("body_map_x"), number("body_map_y")
    marker = ({"x": round(x * bodymap.WIDTH, 2), "y": round(y * bodymap.HEIGHT, 2)}
              if x is not None and y is not None and 0 <= x <= 1 and 0 <= y <= 1 else None)
    return {"regions": bodymap.REGIONS, "marker": marker}


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
        **_body_map_input(form),
        "form": form, "patient": patient, "title": "New lesion", "submit": "Add lesion",
        "cancel_url": reverse("patients:patient_detail", args=[patient.pk]),
    })


def _neighbour_lesions(lesion):
    """The previous and next lesion of the same patient, in the patient page's order."""
    siblings = list(Lesion.objects.filter(patient_id=lesion.patient_id).only("pk", "label", "anatomic_site"))
    siblings.sort(key=lambda l: (l.anatomic_site == "", l.anatomic_site.split(":"), l.label.lower(), l.pk))
    i = next(i for i, l in enumerate(siblings) if l.pk == lesion.pk)
    return (siblings[i - 1] if i > 0 else None), (siblings[i + 1] if i + 1 < len(siblings) else None)


def _render_lesion(request, lesion, upload_form=None, review_form=None):
    images = list(images_in_date_order().filter(lesion=lesion))
    timeline: dict = {}
    for image in images:
        timeline.setdefault(image.acquired_on, []).append(image)
    reviews = list(lesion.reviews.select_related("reviewed_by", "superseded_by"))
    result = lesion_results([lesion.pk]).get(lesion.pk)
    last_reviewed_at = reviews[0].created_at if reviews else None
    previous_lesion, next_lesion = _neighbour_lesions(lesion)
    return render(request, "patients/lesion_detail.html", {
        "reviews": reviews,
        "current_review": reviews[0] if reviews else None,
        "result": result,
        "unreviewed": is_unreviewed(result, last_reviewed_at),
        "body_map_dots": [d for d in [bodymap.dot(lesion, result)] if d],
        "review_form": review_form or ReviewForm(),
        "previous_lesion": previous_lesion,
        "next_lesion": next_lesion,
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
        **_body_map_input(form),
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


def _quality_message(outcomes, names) -> str | None:
    """"Image quality: a.jpg: looks blurred (...)" for new images with quality warnings, else None."""
    lines = []
    for outcome, name in zip(outcomes, names):
        warnings = (outcome.image.quality or {}).get("warnings") or []
        if outcome.created and warnings:
            lines.append(f"{name}: " + "; ".join(w["message"] for w in warnings))
    if not lines:
        return None
    return ("Stored, but check the image quality (a retake may give a more reliable score): "
            + " · ".join(lines))


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
            warning = _quality_message(outcomes, services._client_names(data["files"]))
            if warning:
                messages.warning(request, warning)
            return redirect(reverse("patients:lesion_detail", args=[lesion.pk]) + "#images")
    return _render_lesion(request, lesion, upload_form=form)


# --- reviews -------------------------------------------------------------------------------------

@login_required
@require_http_methods(["POST"])
def review_create(request, pk):
    lesion = get_lesion(request, pk)
    form = ReviewForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            review = services.record_review(
                user=request.user, lesion=lesion, decision=data["decision"], note=data["note"],
                follow_up_months=data["follow_up_months"])
        except ValidationError as e:
            add_service_errors(form, e)
        except PermissionDenied as e:
            form.add_error(None, str(e) or NO_PERMISSION)
        else:
            due = f" Follow-up due {review.follow_up_due:%-d %b %Y}." if review.follow_up_due else ""
            messages.success(request, f"Review recorded: {review.get_decision_display()}.{due}")
            if request.POST.get("next") == "queue":
                return redirect("patients:review_queue")
            return redirect(reverse("patients:lesion_detail", args=[lesion.pk]) + "#review")
    return _render_lesion(request, lesion, review_form=form)


# --- viewer and comparison -----------------------------------------------------------------------

def _lesion_images(lesion):
    return list(LesionImage.objects.filter(lesion=lesion).order_by("acquired_on", "uploaded_at", "id")
                .select_related("uploaded_by"))


def _image_results(images):
    from .results import provider

    module = provider()
    return module.image_results([i.pk for i in images]) if module is not None and images else {}


@login_required
def image_viewer(request, pk):
    image = get_object_or_404(selectors.visible_images(request.user), pk=pk)
    lesion = image.lesion
    services.record_access(user=request.user, obj=image)
    images = _lesion_images(lesion)
    i = next(i for i, im in enumerate(images) if im.pk == image.pk)
    return render(request, "patients/image_viewer.html", {
        "image": image, "lesion": lesion, "patient": lesion.patient, "position": i + 1, "total": len(images),
        "previous_image": images[i - 1] if i > 0 else None,
        "next_image": images[i + 1] if i + 1 < len(images) else None,
        "result": _image_results([image]).get(image.pk),
    })


def _span_words(days: int) -> str:
    """412 days -> "1 year 1 month (412 days)"; short spans in days or weeks."""
    if days < 0:
        days = -days
    if days < 14:
        return f"{days} day{'s' if days != 1 else ''}"
    if days < 61:
        return f"{days // 7} weeks ({days} days)"
    months = round(days / 30.4375)
    years, months = divmod(months, 12)
    parts = []
    if years:
        parts.append(f"{years} year{'s' if years != 1 else ''}")
    if months:
        parts.append(f"{months} month{'s' if months != 1 else ''}")
    return f"{' '.join(parts)} ({days} days)"


@login_required
def lesion_compare(request, pk):
    lesion = get_lesion(request, pk)
    images = _lesion_images(lesion)
    by_pk = {im.pk: im for im in images}

    def pick(name, default):
        try:
            return by_pk[int(request.GET.get(name, ""))]
        except (KeyError, ValueError):
            return default

    first = pick("a", images[0] if images else None)
    second = pick("b", images[-1] if images else None)
    if first is not None and second is not None and (first.acquired_on, first.pk) > (second.acquired_on, second.pk):
        first, second = second, first
    results = _image_results([im for im in (first, second) if im is not None])
    ra = results.get(first.pk) if first else None
    rb = results.get(second.pk) if second else None
    change = None
    if ra is not None and rb is not None:
        same_version = ra.version.pk == rb.version.pk
        change = {"points": (rb.score - ra.score) * 100, "same_version": same_version}
    services.record_access(user=request.user, obj=lesion)
    return render(request, "patients/lesion_compare.html", {
        "lesion": lesion, "patient": lesion.patient, "images": images, "first": first, "second": second,
        "result_a": ra, "result_b": rb, "change": change,
        "days": (second.acquired_on - first.acquired_on).days if first and second else None,
        "span": _span_words((second.acquired_on - first.acquired_on).days) if first and second else "",
    })
