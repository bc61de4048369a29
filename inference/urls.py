from django.urls import path

from . import views

app_name = "inference"
urlpatterns = [
    path("images/<int:pk>/result/", views.image_result, name="image_result"),
]
