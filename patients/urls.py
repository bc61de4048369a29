from django.urls import path

from . import media, reports, views

app_name = "patients"
urlpatterns = [
    path("", views.worklist, name="worklist"),
    path("review/", views.review_queue, name="review_queue"),
    path("follow-ups/", views.follow_ups, name="follow_ups"),
    path("new/", views.patient_create, name="patient_create"),
    path("<int:pk>/", views.patient_detail, name="patient_detail"),
    path("<int:pk>/edit/", views.patient_edit, name="patient_edit"),
    path("<int:pk>/report.pdf", reports.patient_report, name="patient_report"),
    path("<int:pk>/lesions/new/", views.lesion_create, name="lesion_create"),
    path("lesions/<int:pk>/", views.lesion_detail, name="lesion_detail"),
    path("lesions/<int:pk>/edit/", views.lesion_edit, name="lesion_edit"),
    path("lesions/<int:pk>/images/", views.image_upload, name="image_upload"),
    path("lesions/<int:pk>/reviews/", views.review_create, name="review_create"),
    path("lesions/<int:pk>/compare/", views.lesion_compare, name="lesion_compare"),
    path("lesions/<int:pk>/report.pdf", reports.lesion_report, name="lesion_report"),
    path("images/<int:pk>/view/", views.image_viewer, name="image_viewer"),
    # Media is never public: these views check that the user may see the image's patient.
    path("images/<int:pk>/file/", media.image_file, name="image_file"),
    path("images/<int:pk>/thumbnail/", media.image_thumbnail, name="image_thumbnail"),
]
