from django.urls import path

from . import views

app_name = "inference"
urlpatterns = [
    path("images/<int:pk>/result/", views.image_result, name="image_result"),
    path("patients/<int:pk>/context/", views.patient_context, name="patient_context"),
    path("models/", views.model_version_list, name="model_version_list"),
    path("models/<int:pk>/", views.model_version_detail, name="model_version_detail"),
    # A private derived image: same access check as the image it explains.
    path("<int:pk>/heatmap/", views.analysis_heatmap, name="analysis_heatmap"),
]
