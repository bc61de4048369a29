"""API throttling: per token/user (scope ``user``) and per client address for requests without
valid credentials (scope ``anon``). (Not inside melanoma_site.api: DRF imports these classes while
rest_framework.views loads, and that package imports rest_framework.views.)

The rates come from ``settings.API_THROTTLE_RATES`` (environment ``API_THROTTLE_USER`` and
``API_THROTTLE_ANON``), read at each request rather than once at import as DRF's own classes do,
so a changed setting (a test's low rate, a deployment's) takes effect at once. The counters live
in the default cache (Redis when ``REDIS_URL`` is set, shared by every web process). A refused
request answers 429 in the API's one error format with a Retry-After header.

DRF checks throttles after authentication and permissions, so a request with a wrong token, or
with none, would be refused (401) before any throttle counted it, and token guessing would go
unthrottled. The ``anon`` scope therefore counts where those requests are refused: every failed
token (``TokenAuthentication``) and every request without credentials (the default permission,
``IsAuthenticated``) is counted per address, and a client over the rate gets 429 instead of 401.
"""
from django.conf import settings
from rest_framework import authentication, exceptions, permissions
from rest_framework.throttling import SimpleRateThrottle, UserRateThrottle


class _SettingsRate:
    def get_rate(self):
        return settings.API_THROTTLE_RATES.get(self.scope)


class UserThrottle(_SettingsRate, UserRateThrottle):
    """Authenticated requests (token or session), counted per user."""


class AnonThrottle(_SettingsRate, SimpleRateThrottle):
    """Requests without valid credentials, counted per client address (never reads request.user:
    it runs while the request is being authenticated)."""

    scope = "anon"

    def get_cache_key(self, request, view):
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


def throttle_anonymous(request) -> None:
    throttle = AnonThrottle()
    if not throttle.allow_request(request, None):
        raise exceptions.Throttled(wait=throttle.wait())


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's token authentication; a wrong or inactive token counts against the address's rate."""

    def authenticate(self, request):
        try:
            return super().authenticate(request)
        except exceptions.AuthenticationFailed:
            throttle_anonymous(request)
            raise


class IsAuthenticated(permissions.IsAuthenticated):
    """DRF's IsAuthenticated (the default permission); a request without credentials counts against
    its address's rate before it is refused, so a flood of them gets 429."""

    def has_permission(self, request, view):
        if super().has_permission(request, view):
            return True
        throttle_anonymous(request)
        return False
