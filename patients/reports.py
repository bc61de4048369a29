"""PDF report downloads (patient or lesion); access-checked and audited in services.build_report."""
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from . import services
from .views import get_lesion, get_patient


def _pdf_response(pdf: bytes, filename: str) -> HttpResponse:
    response = HttpResponse(pdf, content_type="application/pdf")
    response["Content-Disposition"] = f'inline; filename="{filename}"'
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    return response


@login_required
@require_safe
@never_cache
def patient_report(request, pk):
    patient = get_patient(request, pk)
    pdf = services.build_report(user=request.user, patient=patient)
    return _pdf_response(pdf, f"report-{patient.mrn}.pdf".replace('"', ""))


@login_required
@require_safe
@never_cache
def lesion_report(request, pk):
    lesion = get_lesion(request, pk)
    pdf = services.build_report(user=request.user, patient=lesion.patient, lesion=lesion)
    return _pdf_response(pdf, f"report-{lesion.patient.mrn}-lesion-{lesion.pk}.pdf".replace('"', ""))
