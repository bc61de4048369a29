from django.urls import path
from rest_framework.routers import SimpleRouter

from .views import AnalysisViewSet, ImageAnalysesView, ModelVersionViewSet

router = SimpleRouter()
router.register("analyses", AnalysisViewSet, basename="analysis")
router.register("model-versions", ModelVersionViewSet, basename="modelversion")
urlpatterns = [
    path("images/<int:image_pk>/analyses/", ImageAnalysesView.as_view(), name="image-analyses"),
    *router.urls,
]
