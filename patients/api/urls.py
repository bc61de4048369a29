from django.urls import path
from rest_framework.routers import SimpleRouter

from .views import (
    LesionImagesView,
    LesionImageViewSet,
    LesionReviewViewSet,
    LesionViewSet,
    PatientLesionsView,
    PatientViewSet,
)

app_name = "api"

# The API root (every collection of both apps) is melanoma_site.api.root.APIRootView.
router = SimpleRouter()
router.register("patients", PatientViewSet, basename="patient")
router.register("lesions", LesionViewSet, basename="lesion")
router.register("images", LesionImageViewSet, basename="image")
router.register("reviews", LesionReviewViewSet, basename="review")

urlpatterns = [
    path("patients/<int:patient_pk>/lesions/", PatientLesionsView.as_view(), name="patient-lesions"),
    path("lesions/<int:lesion_pk>/images/", LesionImagesView.as_view(), name="lesion-images"),
    *router.urls,
]
