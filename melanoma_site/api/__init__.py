"""The REST API's shared contract (/api/v1/): one error format, strict query parameters, pagination
with a maximum page size, ordering that refuses unknown fields, the status codes each operation
documents, and the API root that lists every collection.

Everything here is used by both apps' API modules (patients.api, inference.api), so the schema
(drf-spectacular) and the server are derived from the same definitions:

* Errors, always ``application/json``::

      {"code": "invalid", "detail": "mrn: This field may not be blank.", "errors": {"mrn": ["..."]}}

  ``errors`` maps a field (a body field, a query parameter, ``files.0`` for an item of a list,
  ``non_field_errors`` for the request as a whole) to its messages; it is ``{}`` for errors that are
  not about a field (401, 403, 404, ...).
* 400 means the request does not match the schema (a wrong type, a missing field, a value outside
  the documented enum or range, an unknown or repeated query parameter). 422 means it does match the
  schema but a rule the schema cannot express refused it (an id you cannot see or that does not
  exist inside a body, a duplicate record number, a date in the future, a file that is not an image).
* A query parameter given with an empty value (``?status=``) is the same as not giving it.
"""
from __future__ import annotations

import copy
import math
import re

import django_filters
import django_filters.fields
from django import forms
from django.core.exceptions import PermissionDenied
from django.core.paginator import InvalidPage
from django.db.models import F
from django.http import Http404, JsonResponse
from django.views import defaults
from django_filters.rest_framework import DjangoFilterBackend
from django_filters.widgets import SuffixedMultiWidget
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import exceptions, filters, mixins, serializers, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler as drf_exception_handler

API_PREFIX = "/api/"
NUL_FREE = "^[^\\u0000]*$"  # ECMA-262 (OpenAPI) spelling of "no NUL character"
MAX_PAGE_SIZE = 200

# Serializer error codes for rules the schema cannot express: answered 422, not 400.
UNPROCESSABLE_CODES = {
    "does_not_exist",  # an id (inside a body) that does not exist or that you cannot see
    "unique",
    "rejected",  # a service refused the request (services raise Django ValidationErrors)
    "null_characters_not_allowed",
    "surrogate_characters_not_allowed",
}


# --- error format -----------------------------------------------------------------------------

class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(
        help_text="Machine-readable reason: invalid (400, the request does not match the schema), "
                  "rejected (422, a rule refused it), not_authenticated / authentication_failed (401), "
                  "permission_denied (403), not_found (404), not_acceptable (406), "
                  "unsupported_media_type (415), throttled (429), ...")
    detail = serializers.CharField(help_text="A human-readable summary.")
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text="Messages per field, body field or query parameter (`non_field_errors`: the request as a "
                  "whole; `files.0`: the first item of a list). Empty when the error is not about a field.",
    )


def flatten_errors(detail, prefix: str = "") -> dict[str, list]:
    """DRF's nested error detail as ``{"field" | "field.0" | "field.sub": [ErrorDetail, ...]}``."""
    out: dict[str, list] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            for k, v in flatten_errors(value, name).items():
                out.setdefault(k, []).extend(v)
    elif isinstance(detail, (list, tuple)):
        if all(not isinstance(item, (dict, list, tuple)) for item in detail):
            out[prefix or api_settings.NON_FIELD_ERRORS_KEY] = list(detail)
        else:
            for i, item in enumerate(detail):
                if item in ({}, []):
                    continue
                for k, v in flatten_errors(item, f"{prefix}.{i}" if prefix else str(i)).items():
                    out.setdefault(k, []).extend(v)
    else:
        out[prefix or api_settings.NON_FIELD_ERRORS_KEY] = [detail]
    return out


def _codes(errors: dict[str, list]) -> set[str]:
    return {getattr(message, "code", None) or "invalid" for messages in errors.values() for message in messages}


def error_body(code: str, detail: str, errors: dict | None = None) -> dict:
    return {"code": code, "detail": detail, "errors": {k: [str(m) for m in v] for k, v in (errors or {}).items()}}


def _summary(errors: dict[str, list]) -> str:
    parts = []
    for field, messages in errors.items():
        text = " ".join(str(m) for m in messages)
        parts.append(text if field == api_settings.NON_FIELD_ERRORS_KEY else f"{field}: {text}")
    return " ".join(parts) or "Invalid input."


def exception_handler(exc, context):
    """Every API error in the one format; validation errors split into 400 (schema) and 422 (rules)."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(*exc.args)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a server error: Django's handler500 (JSON under /api/) answers
    if isinstance(exc, exceptions.ValidationError):
        errors = flatten_errors(exc.detail)
        query = getattr(exc, "query_parameters", False)
        if not query and errors and _codes(errors) <= UNPROCESSABLE_CODES:
            response.status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
            response.data = error_body("rejected", _summary(errors), errors)
        else:
            response.data = error_body("invalid", _summary(errors), errors)
        return response
    code = exc.get_codes()
    code = code if isinstance(code, str) else getattr(exc, "default_code", "error")
    detail = exc.detail if isinstance(exc.detail, str) else _summary(flatten_errors(exc.detail))
    response.data = error_body(code, str(detail))
    return response


def not_found(request, exception=None):
    """handler404: under /api/ a URL that matches no route answers in the API's error format."""
    if request.path.startswith(API_PREFIX):
        return JsonResponse(error_body("not_found", "Not found."), status=404)
    return defaults.page_not_found(request, exception)


def server_error(request):
    """handler500: under /api/ in the API's error format (the details are in the server log only)."""
    if request.path.startswith(API_PREFIX):
        return JsonResponse(error_body("server_error", "Server error; it has been logged."), status=500)
    return defaults.server_error(request)


class QueryParameterError(exceptions.ValidationError):
    """A query parameter that is unknown, repeated or malformed: always 400, named in ``errors``."""

    query_parameters = True


# --- JSON bodies ----------------------------------------------------------------------------

def _json_type(field):
    """The JSON type the schema documents for a writable serializer field (None: not checked here)."""
    if isinstance(field, serializers.BooleanField):
        return "boolean", (bool,)
    if isinstance(field, (serializers.IntegerField, serializers.RelatedField)):
        return "integer", (int,)
    if isinstance(field, (serializers.FloatField, serializers.DecimalField)):
        return "number", (int, float)
    if isinstance(field, (serializers.CharField, serializers.ChoiceField, serializers.DateField,
                          serializers.DateTimeField)):
        return "string", (str,)
    return None


class StrictJSONMixin:
    """A JSON body's values must have the documented JSON types: DRF would otherwise take 5 for a
    name or "0.5" for a number (it was built to read HTML forms too). A text that is only
    whitespace is refused by a rule (422): the schema's minLength counts it as text."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            errors = {}
            for name, field in self.fields.items():
                if field.read_only or name not in data or data[name] is None:
                    continue
                value, expected = data[name], _json_type(field)
                if expected and (not isinstance(value, expected[1]) or (
                        isinstance(value, bool) and expected[0] != "boolean")):
                    errors[name] = [serializers.ErrorDetail(f"Must be a JSON {expected[0]}.", code="invalid")]
                elif (isinstance(field, serializers.CharField) and not field.allow_blank and isinstance(value, str)
                        and value and not value.strip()):
                    errors[name] = [serializers.ErrorDetail("This field may not be blank.", code="rejected")]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)


# --- query parameters -------------------------------------------------------------------------

def _widget_names(name: str, field) -> list[str]:
    widget = field.widget
    if isinstance(widget, SuffixedMultiWidget):
        return [f"{name}_{suffix}" if suffix else name for suffix in widget.suffixes]
    return [name]


def is_list_request(view, method: str | None = None) -> bool:
    """Lists are where filters, search, ordering and pagination apply (as in the schema)."""
    if hasattr(view, "action"):
        return view.action == "list"
    method = method or getattr(getattr(view, "request", None), "method", "GET")
    return method == "GET" and isinstance(view, mixins.ListModelMixin)


def accepted_query_params(view, method: str | None = None) -> set[str]:
    """Every query parameter this view accepts for this request: exactly the documented ones."""
    names: set[str] = set()
    if is_list_request(view, method):
        for backend_class in getattr(view, "filter_backends", []):
            names |= set(backend_class().accepted_query_params(view))
        paginator = getattr(view, "paginator", None)
        if paginator is not None:
            names |= {p["name"] for p in paginator.get_schema_operation_parameters(view)}
    return names


def check_query_params(view, request) -> None:
    accepted = accepted_query_params(view, request.method)
    errors = {}
    for name in request.query_params:
        values = request.query_params.getlist(name)
        if name == api_settings.URL_FORMAT_OVERRIDE:
            continue  # content negotiation (?format=json), like the Accept header
        if name not in accepted:
            errors[name] = ["Unknown query parameter" + (
                f"; this operation accepts: {', '.join(sorted(accepted))}." if accepted
                else "; this operation accepts none.")]
        elif len(values) > 1:
            errors[name] = ["Give this parameter once."]
        elif "\x00" in values[0]:
            errors[name] = ["NUL characters are not allowed."]
    if errors:
        raise QueryParameterError(errors)


class ContractMixin:
    """For every API view: query parameters checked before anything runs (after authentication, so
    an anonymous caller gets 401), and Django ValidationErrors of the services as 422 field errors."""

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        method = request.method.lower()
        if method in self.http_method_names and hasattr(self, method):  # else 405 answers
            check_query_params(self, request)


class StrictFilterBackend(DjangoFilterBackend):
    """django-filter; its form's errors name the parameter (400). Accepted names follow the widgets
    (a date range ``acquired_on`` is ``acquired_on_after`` / ``acquired_on_before``)."""

    def accepted_query_params(self, view) -> list[str]:
        filterset_class = getattr(view, "filterset_class", None)
        if filterset_class is None:
            return []
        return [n for name, f in filterset_class.base_filters.items() for n in _widget_names(name, f.field)]

    def filter_queryset(self, request, queryset, view):
        # Without any of its parameters a FilterSet filters nothing (every filter skips an absent
        # value), but building it deep-copies its filters and form fields, vocabulary choices
        # included: several milliseconds of every unfiltered list page.
        if not any(name in request.query_params for name in self.accepted_query_params(view)):
            return queryset
        try:
            return super().filter_queryset(request, queryset, view)
        except exceptions.ValidationError as exc:
            raise QueryParameterError(self._by_parameter(view, request, exc.detail)) from None

    @staticmethod
    def _by_parameter(view, request, detail):
        """Errors of a range filter (``acquired_on``) named by the parameters given (``acquired_on_after``)."""
        if not isinstance(detail, dict):
            return detail
        out = {}
        for name, messages in detail.items():
            f = view.filterset_class.base_filters.get(name)
            names = _widget_names(name, f.field) if f is not None else [name]
            given = [n for n in names if n in request.query_params] or names
            for n in given:
                out[n] = messages
        return out


class SearchFilter(filters.SearchFilter):
    def accepted_query_params(self, view) -> list[str]:
        return [self.search_param] if getattr(view, "search_fields", None) else []

    def get_schema_operation_parameters(self, view):
        if not getattr(view, "search_fields", None):
            return []
        fields = ", ".join(f.lstrip("^=@$").replace("__", " ") for f in view.search_fields)
        return [{
            "name": self.search_param, "required": False, "in": "query", "allowEmptyValue": True,
            "description": f"Words that must each appear in one of: {fields} (case-insensitive).",
            "schema": {"type": "string", "pattern": NUL_FREE},
        }]


class OrderingFilter(filters.OrderingFilter):
    """``?ordering=a,-b``: only the view's ``ordering_fields``; an unknown one is a 400 naming it.
    Empty values sort last in both directions; the primary key breaks ties (stable pages)."""

    def allowed(self, view) -> list[str]:
        return list(getattr(view, "ordering_fields", None) or [])

    def accepted_query_params(self, view) -> list[str]:
        return [self.ordering_param] if self.allowed(view) else []

    def get_ordering(self, request, queryset, view):
        raw = request.query_params.get(self.ordering_param, "")
        if not raw or not self.allowed(view):
            return self.get_default_ordering(view)
        terms = [t.strip() for t in raw.split(",")]
        allowed = set(self.allowed(view))
        bad = [t for t in terms if t.lstrip("-") not in allowed or t.startswith("--") or not t]
        if bad:
            raise QueryParameterError({self.ordering_param: [
                f"Unknown ordering {', '.join(repr(b) for b in bad)}; choose from "
                f"{', '.join(sorted(allowed))} (prefix - for descending)."]})
        return terms

    def filter_queryset(self, request, queryset, view):
        ordering = self.get_ordering(request, queryset, view)
        if not ordering:
            return queryset
        expressions = []
        for term in ordering:
            if hasattr(term, "resolve_expression"):
                expressions.append(term)
                continue
            name = term.lstrip("-")
            expr = F(name)
            expressions.append(expr.desc(nulls_last=True) if term.startswith("-") else expr.asc(nulls_last=True))
        if not any(str(t).lstrip("-") in ("id", "pk") for t in ordering):
            expressions.append(F("pk").asc())
        return queryset.order_by(*expressions)

    def get_schema_operation_parameters(self, view):
        allowed = self.allowed(view)
        if not allowed:
            return []
        default = ", ".join(str(t) for t in (self.get_default_ordering(view) or [])) or "id"
        return [{
            "name": self.ordering_param, "required": False, "in": "query", "allowEmptyValue": True,
            "style": "form", "explode": False,
            "description": f"Sort by these fields, comma separated; prefix - for descending. Empty values "
                           f"sort last. Default: {default}.",
            "schema": {"type": "array", "items": {"type": "string", "enum": [
                term for name in allowed for term in (name, f"-{name}")]}},
        }]


class Pagination(PageNumberPagination):
    page_size_query_param = "page_size"
    max_page_size = MAX_PAGE_SIZE
    last_page_strings = ()

    def _number(self, request, name: str, *, maximum: int | None = None) -> int | None:
        raw = request.query_params.get(name, "")
        if raw == "":
            return None
        too_long = len(raw) > 18  # far past any last page or maximum
        if not re.fullmatch(r"[0-9]+", raw) or (not too_long and int(raw) < 1) or (
                maximum is not None and (too_long or int(raw) > maximum)):
            bound = f" from 1 to {maximum}" if maximum is not None else " of at least 1"
            raise QueryParameterError({name: [f"A whole number{bound}."]})
        if too_long:
            raise exceptions.NotFound(self.invalid_page_message)
        return int(raw)

    def get_page_size(self, request):
        return self._number(request, self.page_size_query_param, maximum=self.max_page_size) or self.page_size

    def get_page_number(self, request, paginator):
        return self._number(request, self.page_query_param) or 1

    def paginate_lazily(self, queryset, request, view=None):
        """``paginate_queryset`` without reading the page: the same checks, count and links, but
        the page's rows stay an unevaluated slice of ``queryset``, so a list whose rows come from
        the cache (melanoma_site.api.rows) runs the count and no page query."""
        self.request = request
        page_size = self.get_page_size(request)
        if not page_size:
            return None
        paginator = self.django_paginator_class(queryset, page_size)
        page_number = self.get_page_number(request, paginator)
        try:
            self.page = paginator.page(page_number)
        except InvalidPage as exc:
            raise exceptions.NotFound(self.invalid_page_message.format(page_number=page_number, message=str(exc)))
        if paginator.num_pages > 1 and self.template is not None:
            self.display_page_controls = True
        return self.page.object_list

    def get_schema_operation_parameters(self, view):
        return [
            {"name": self.page_query_param, "required": False, "in": "query", "allowEmptyValue": True,
             "description": "Page number (from 1). A page past the last one answers 404.",
             "schema": {"type": "integer", "minimum": 1}},
            {"name": self.page_size_query_param, "required": False, "in": "query", "allowEmptyValue": True,
             "description": f"Results per page (default {self.page_size}, at most {self.max_page_size}).",
             "schema": {"type": "integer", "minimum": 1, "maximum": self.max_page_size}},
        ]


def _share(choices, memo: dict) -> None:
    if isinstance(choices, (list, tuple)):
        memo.setdefault(id(choices), choices)


class ChoiceField(django_filters.fields.ChoiceField):
    """django-filter's choice form field whose copies share its choices: a FilterSet's form is
    built (its fields deep-copied) for every filtered request, and copying a vocabulary of
    hundreds of choices (anatomic sites, diagnoses) was most of a filtered lesion list's time.
    Choices are never changed in place."""

    def __deepcopy__(self, memo):
        _share(getattr(self._choices, "choices", None), memo)
        return super().__deepcopy__(memo)


class ChoiceFilter(django_filters.ChoiceFilter):
    """django-filter's ChoiceFilter whose copies (one per filtered request) share its choices."""

    field_class = ChoiceField

    def __deepcopy__(self, memo):
        _share(self.extra.get("choices"), memo)
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


class FilterSet(django_filters.FilterSet):
    """The API's FilterSets: a choice filter made from a model field's choices is a ChoiceFilter
    (above), like the declared ones."""

    @classmethod
    def filter_for_lookup(cls, field, lookup_type):
        filter_class, params = super().filter_for_lookup(field, lookup_type)
        return (ChoiceFilter if filter_class is django_filters.ChoiceFilter else filter_class), params


@extend_schema_field(OpenApiTypes.INT)
class IdFilter(django_filters.NumberFilter):
    """A related id as a plain number, never a model choice: an id the user cannot see reads exactly
    like one that does not exist (an empty result), and no form lists other patients' records."""

    field_class = forms.IntegerField


class StrictBooleanField(forms.Field):
    def to_python(self, value):
        if value in (None, ""):
            return None
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise forms.ValidationError("Either true or false.", code="invalid")


@extend_schema_field(OpenApiTypes.BOOL)
class BooleanFilter(django_filters.Filter):
    """``true`` / ``false`` only (django-filter's own reads any other value as "not given")."""

    field_class = StrictBooleanField


class FiniteFloatField(forms.Field):
    def to_python(self, value):
        if value in (None, ""):
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise forms.ValidationError("Enter a number.", code="invalid") from None
        if not math.isfinite(number):
            raise forms.ValidationError("Enter a finite number.", code="invalid")
        return number


@extend_schema_field(OpenApiTypes.DOUBLE)
class NumberFilter(django_filters.Filter):
    """A number compared with a float column (any finite value; no hidden bound)."""

    field_class = FiniteFloatField
