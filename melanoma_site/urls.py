from django.contrib import admin
from django.contrib.auth.decorators import login_required
from django.http import HttpResponseRedirect
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from .api.root import APIRootView

# Under /api/ a URL that matches no route, or a server error, answers in the API's error format.
handler404 = "melanoma_site.api.not_found"
handler500 = "melanoma_site.api.server_error"


def favicon(request):
    """Browsers ask for /favicon.ico whatever the page says: send them to the static file."""
    return HttpResponseRedirect(static("favicon.ico"))

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="patients:worklist", permanent=False)),
    path("favicon.ico", favicon),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("patients/", include("patients.urls")),
    path("analyses/", include("inference.urls")),
    path("api/v1/", APIRootView.as_view(), name="api-root"),
    path("api/v1/", include("patients.api.urls")),
    path("api/v1/", include("inference.api.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # The interactive docs are a page for people: logged out, they go to the login page first. The
    # split view serves its start-up script as a file of its own (no inline script, for the CSP).
    path("api/v1/docs/", login_required(SpectacularSwaggerSplitView.as_view(url_name="api-schema")), name="api-docs"),
]
