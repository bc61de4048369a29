"""The polling fragment (the analysis result of one image, as the partial's HTML) and the model
card pages."""
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from patients.models import LesionImage, Patient

from . import services
from .models import ModelVersion


@require_GET
@never_cache
def image_result(request, pk):
    # 404 (not 403, not a login redirect) unless the image's patient is visible to this user.
    image = get_object_or_404(
        LesionImage.objects.filter(lesion__patient__in=Patient.objects.visible_to(request.user))
        .prefetch_related(services.analysis_prefetch()),
        pk=pk,
    )
    return render(request, "inference/_image_result.html", {"image": image, "fragment": True})


@require_GET
@never_cache
def patient_context(request, pk):
    """The patient-context section as a fragment (polled while a context score is pending)."""
    patient = get_object_or_404(Patient.objects.visible_to(request.user), pk=pk)
    return render(request, "inference/_patient_context.html", {"patient": patient, "fragment": True})


@require_GET
@login_required
def model_version_list(request):
    """Every installed model version with its validation status and headline held-out metrics.
    Model cards hold no patient data: every signed-in user may read them."""
    versions = ModelVersion.objects.order_by("-is_active", "-installed_at")
    return render(request, "inference/model_version_list.html", {"versions": versions})


@require_GET
@login_required
def model_version_detail(request, pk):
    """One model card: members, combiner, per-source held-out metrics, calibration, threshold,
    data provenance and the validation status."""
    version = get_object_or_404(ModelVersion, pk=pk)
    return render(request, "inference/model_version_detail.html", {"v": version})
