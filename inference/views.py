"""The polling fragment (the analysis result of one image, as the partial's HTML), the model card
pages and the heatmap file."""
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_safe

from patients.media import serve_stored_file
from patients.selectors import visible_images, visible_patients

from . import selectors, services
from .models import Analysis, ModelVersion


@require_GET
@never_cache
def image_result(request, pk):
    # 404 (not 403, not a login redirect) unless the image's patient is visible to this user.
    image = get_object_or_404(
        visible_images(request.user).prefetch_related(selectors.analysis_prefetch()),
        pk=pk,
    )
    return render(request, "inference/_image_result.html", {"image": image, "fragment": True})


@require_GET
@never_cache
def patient_context(request, pk):
    """The patient-context section as a fragment (polled while a context score is pending)."""
    patient = get_object_or_404(visible_patients(request.user), pk=pk)
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
    return render(request, "inference/model_version_detail.html",
                  {"v": version, "runtime": services.runtime_summary(model_version=version)})


def get_visible_analysis(user, pk) -> Analysis:
    """The analysis ``pk`` if its image's patient is visible to ``user``; 404 otherwise (never 403)."""
    return get_object_or_404(
        selectors.visible_analyses(user).select_related("image__lesion__patient"), pk=pk)


def serve_heatmap(request, analysis: Analysis, *, user=None):
    """The analysis's heatmap PNG, with the same access check, audit entry and headers as the image."""
    etag = f'"heatmap-{analysis.pk}-{analysis.heatmap.name.rsplit("/", 1)[-1]}"' if analysis.heatmap else None
    return serve_stored_file(request, image=analysis.image, field=analysis.heatmap, content_type="image/png",
                             etag=etag, filename=f"heatmap-analysis-{analysis.pk}.png", user=user)


@require_safe
@login_required
def analysis_heatmap(request, pk):
    return serve_heatmap(request, get_visible_analysis(request.user, pk))
