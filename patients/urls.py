from django.urls import path

from . import media, views

app_name = "patients"
urlpatterns = [
    path("", views.worklist, name="worklist"),
    path("new/", views.patient_create, name="patient_create"),
    path("<int:pk>/", views.patient_detail, name="patient_detail"),
    path("<int:pk>/edit/", views.patient_edit, name="patient_edit"),
    path("<int:pk>/lesions/new/", views.lesion_create, name="lesion_create"),
    path("lesions/<int:pk>/", views.lesion_detail, name="lesion_detail"),
    path("lesions/<int:pk>/edit/", views.lesion_edit, name="lesion_edit"),
    path("lesions/<int:pk>/images/", views.image_upload, name="image_upload"),
    # Media is never public: these views check that the user may see the image's patient.
    path("images/<int:pk>/file/", media.image_file, name="image_file"),
    path("images/<int:pk>/thumbnail/", media.image_thumbnail, name="image_thumbnail"),
]
