"""The polling fragment: the analysis result of one image, as the partial's HTML."""
from django.shortcuts import get_object_or_404, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from patients.models import LesionImage, Patient

from . import services


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
