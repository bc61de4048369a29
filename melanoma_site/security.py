"""Content-Security-Policy header, built from settings (Django 5.2 has no built-in CSP).

``CONTENT_SECURITY_POLICY`` maps directives to source lists. The site's own pages satisfy it as
is: scripts and styles come from static files only (no inline ``<script>``, ``<style>`` or
``style=""``; dynamic values go through classes, SVG attributes or data-* attributes read by static
scripts). The vendor interfaces (Django admin, DRF's browsable API, Swagger UI) ship templates with
inline style attributes and ``<style>`` blocks, so under ``CSP_INLINE_STYLE_PATHS`` the policy also
allows inline *styles*; scripts stay restricted to this site everywhere.
"""
from django.conf import settings

HEADER = "Content-Security-Policy"
REPORT_ONLY_HEADER = "Content-Security-Policy-Report-Only"


def build_policy(directives: dict[str, list[str]]) -> str:
    return "; ".join(f"{name} {' '.join(values)}".strip() for name, values in directives.items())


def policy_for_path(path: str) -> str:
    directives = {name: list(values) for name, values in settings.CONTENT_SECURITY_POLICY.items()}
    if any(path.startswith(prefix) for prefix in settings.CSP_INLINE_STYLE_PATHS):
        directives["style-src"] = directives.get("style-src", ["'self'"]) + ["'unsafe-inline'"]
    return build_policy(directives)


class ContentSecurityPolicyMiddleware:
    """Adds the policy to every response that does not set one itself."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        header = REPORT_ONLY_HEADER if settings.CSP_REPORT_ONLY else HEADER
        if settings.CONTENT_SECURITY_POLICY and header not in response:
            response[header] = policy_for_path(request.path)
        return response


def lockout_response(request, original_response=None, credentials=None):
    """django-axes' answer to a locked-out login (the site's and the admin's): a page that says what
    happened and for how long, status 429."""
    from axes.helpers import get_client_username, get_cool_off, get_failure_limit
    from django.shortcuts import render

    cool_off = get_cool_off(request)
    context = {
        "failure_limit": get_failure_limit(request, credentials),
        "username": get_client_username(request, credentials) or "",
        "cooloff_minutes": max(1, round(cool_off.total_seconds() / 60)) if cool_off else None,
    }
    return render(request, "registration/locked_out.html", context, status=settings.AXES_HTTP_RESPONSE_CODE)


def client_address(request) -> str | None:
    """The client's address for lockout and throttling: ``REMOTE_ADDR``, or with
    ``TRUSTED_PROXY_COUNT`` = n proxies in front, the n-th address from the right of
    X-Forwarded-For (the one the outermost trusted proxy saw). Addresses a client puts in the
    header itself stay to the left and are never used. Same rule as DRF's ``NUM_PROXIES``."""
    remote = request.META.get("REMOTE_ADDR")
    count = settings.TRUSTED_PROXY_COUNT
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if not count or not forwarded:
        return remote
    addresses = [a.strip() for a in forwarded.split(",") if a.strip()]
    return addresses[-min(count, len(addresses))] if addresses else remote
