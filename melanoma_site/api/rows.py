"""Fast reads of the API lists: rows built from ``values_list()`` tuples instead of model instances
passed through DRF serializer fields.

A list page of 50 rows spent most of its time making model instances and running DRF's per-field
machinery (``get_attribute``, ``to_representation``, field deep copies), then encoding the same
nested model-version dicts once per row. The serializers stay THE definition of each
representation (the OpenAPI schema, writes, single objects); a list view names a row builder
(``list_rows``) that produces the same JSON for the same rows, and tests/test_api_rows.py checks the
two byte for byte on every list. ``list_rows = None`` (or no builder) is DRF's own list.

A row builder is a class made once per request, ``Builder(request)``, with ``columns`` (the
``values_list`` names) and ``__call__(tuples) -> [row dict, ...]``.
"""
from __future__ import annotations

import datetime
import json
import re
import secrets

from django.conf import settings
from django.utils import timezone
from rest_framework import ISO_8601, renderers, serializers
from rest_framework.compat import LONG_SEPARATORS, SHORT_SEPARATORS
from rest_framework.response import Response
from rest_framework.settings import api_settings

# A made-up id: a URL is built once per response with it and the real id put in its place per row
# (reverse() and build_absolute_uri() per row were a good part of a list's time).
PLACEHOLDER = "9876543210123"


def url_maker(request, path: str):
    """``pk -> absolute URL`` for a ``path`` that holds :data:`PLACEHOLDER` where the id goes (the
    same text ``request.build_absolute_uri`` gives for the real path: an id is plain digits)."""
    template = request.build_absolute_uri(path) if request is not None else path
    parts = template.split(PLACEHOLDER)
    return lambda pk: str(int(pk)).join(parts)


def datetime_text():
    """``value -> text`` as DRF's ``DateTimeField`` writes it (ISO 8601 in the current time zone, UTC
    as ``Z``), with the time zone looked up once per response instead of once per value."""
    field = serializers.DateTimeField()
    if api_settings.DATETIME_FORMAT != ISO_8601 or not settings.USE_TZ:
        return field.to_representation
    zone = timezone.get_current_timezone()
    aware = timezone.is_aware

    def text(value):
        if not value:
            return None
        if type(value) is not datetime.datetime or not aware(value):
            return field.to_representation(value)  # not what the database gives; DRF decides
        out = value.astimezone(zone).isoformat()
        return out[:-6] + "Z" if out.endswith("+00:00") else out

    return text


def date_text(value):
    """DRF's ``DateField`` output (ISO 8601) for a date from the database."""
    if not value:
        return None
    if api_settings.DATE_FORMAT != ISO_8601:
        return serializers.DateField().to_representation(value)
    return value.isoformat()


def optional_float(value):
    return None if value is None else float(value)


class RowListMixin:
    """``list`` from the view's row builder (``list_rows``) over the same filtered, ordered,
    paginated queryset as DRF's list: same visibility selector, same count, same envelope."""

    list_rows = None

    def list(self, request, *args, **kwargs):
        from patients import pagecache

        builder_class = self.list_rows
        if builder_class is None:
            return super().list(request, *args, **kwargs)
        tuples = _Tuples(self.filter_queryset(self.get_queryset()), builder_class.columns)
        # the count, the links and a page that does not exist as always; the page's rows unread
        lazily = getattr(self.paginator, "paginate_lazily", None)
        page = lazily(tuples, request, view=self) if lazily else self.paginate_queryset(tuples)
        # The page's rows are built once per change of the visible patients' records (change
        # stamps, patients.pagecache): a hit runs neither the page query nor the builder, and
        # for JSON (not the browsable API) keeps the rows' encoded text, so nothing is encoded
        # again either.
        key = pagecache.list_key(request, type(self).__name__)
        renderer = getattr(request, "accepted_renderer", None)
        as_text = key is not None and type(renderer) is SharedJSONRenderer and renderer.get_indent(
            getattr(request, "accepted_media_type", ""), {}) is None
        if as_text:
            key += ":json"

        def build():
            rows = builder_class(request)(page if page is not None else tuples.tuples)
            if as_text:
                pre = PreRendered.of(rows, renderer)
                return (list(pre), pre.json)
            return rows

        # built by one request per key, the others wait for it (a change to the records changes
        # every list's key at once: pagecache.get_or_build)
        rows = pagecache.get_or_build(key, build)
        if as_text:
            rows = PreRendered(*rows)
        if page is not None:
            return self.get_paginated_response(rows)
        return Response(rows)


class PreRendered(list):
    """A list page's rows whose JSON text is already made (the page cache): the list itself
    holds what the audit entry needs of each row (``id``, ``patient``); ``json`` is the text of
    the whole array exactly as the JSON renderer writes it, put in place by
    :class:`SharedJSONRenderer`."""

    def __init__(self, refs, json: str):
        super().__init__(refs)
        self.json = json

    @classmethod
    def of(cls, rows: list, renderer) -> "PreRendered":
        empty = renderer.render({"results": []}).decode()
        full = renderer.render({"results": rows}).decode()
        head, tail = empty.split("[]", 1)
        text = full[len(head):len(full) - len(tail)]
        return cls([{"id": row["id"], "patient": row.get("patient")} for row in rows], text)


class _Tuples:
    """What the paginator pages: counted on the filtered queryset itself (the joins that the related
    columns add would be in the COUNT too), sliced as ``values_list`` tuples."""

    def __init__(self, queryset, columns):
        self.queryset = queryset
        # values_list() ignores select_related; prefetches are for instances, not tuples.
        self.tuples = queryset.prefetch_related(None).values_list(*columns)
        self.ordered = queryset.ordered

    def count(self) -> int:
        return self.queryset.count()

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, index):
        return self.tuples[index]


class Shared(dict):
    """A value that many rows of one response share (the same object): encoded to JSON once per
    response by :class:`SharedJSONRenderer`, not once per row. Otherwise an ordinary dict."""


class SharedJSONRenderer(renderers.JSONRenderer):
    """DRF's JSON renderer, byte for byte; a list page whose rows hold :class:`Shared` values (an
    analysis row's model version: 6 KB of metrics, 90% of the page) encodes each of them once and
    puts the text in every row that holds it."""

    def render(self, data, accepted_media_type=None, renderer_context=None):
        rows = data.get("results") if isinstance(data, dict) else None
        indent = self.get_indent(accepted_media_type, renderer_context or {})
        if type(rows) is PreRendered and indent is None:
            # the envelope (count, links) encoded with a marker for the rows, then their text put in
            marker = f"\x00{secrets.token_hex(8)}:rows"
            envelope = super().render({**data, "results": marker}, accepted_media_type, renderer_context)
            return envelope.decode().replace(json.dumps(marker), rows.json, 1).encode()
        if indent is not None or not isinstance(rows, list) or not any(
                type(value) is Shared for row in rows if isinstance(row, dict) for value in row.values()):
            return super().render(data, accepted_media_type, renderer_context)
        encode = self.encoder_class(ensure_ascii=self.ensure_ascii, allow_nan=not self.strict,
                                    separators=SHORT_SEPARATORS if self.compact else LONG_SEPARATORS).encode
        # The page is encoded once (C speed) with a marker string in place of each shared value,
        # then each marker is replaced by its value's text. A marker starts with NUL, which no
        # text from the database holds (PostgreSQL stores none, in text or jsonb; the API refuses
        # it in input), and carries a random token: no other value encodes to a marker's text.
        token = secrets.token_hex(8)
        markers: dict[int, str] = {}
        texts: dict[str, str] = {}

        def marker(value: Shared) -> str:
            name = markers.get(id(value))
            if name is None:
                name = markers[id(value)] = f"\x00{token}:{len(markers)}"
                texts[encode(name)] = encode(value)
            return name

        skeleton = [{key: marker(value) if type(value) is Shared else value for key, value in row.items()}
                    if isinstance(row, dict) else row for row in rows]
        text = encode({**data, "results": skeleton})
        text = re.sub(r'"\\u0000%s:\d+"' % token, lambda match: texts[match.group()], text)
        # as DRF: \u2028 and \u2029 escaped, so the JSON is also a JavaScript subset
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def shared_json_renderers() -> list:
    """The default renderers (settings) with DRF's JSONRenderer replaced by SharedJSONRenderer."""
    return [SharedJSONRenderer if r is renderers.JSONRenderer else r for r in api_settings.DEFAULT_RENDERER_CLASSES]


# Every list with a row builder answers through SharedJSONRenderer (the same bytes as DRF's
# JSONRenderer), which also puts a cached page's pre-encoded rows in place.
RowListMixin.renderer_classes = shared_json_renderers()
