from django.urls import path
from djangodemo import views

urlpatterns = [
    path("upload", views.upload),
    path("stream", views.stream),
    path("file", views.file),
    path("client", views.client),
]
