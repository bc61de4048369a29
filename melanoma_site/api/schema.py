"""drf-spectacular for the API contract: every error status code each operation can answer, with the
one error body (melanoma_site.api.ErrorSerializer), and the schema details the server enforces."""
import re

from drf_spectacular.openapi import AutoSchema

from . import NUL_FREE, ErrorSerializer, is_list_request

ERROR_DESCRIPTIONS = {
    "400": "The request does not match the schema: a body field or query parameter that is missing, of the "
           "wrong type or outside its range, or a query parameter that is unknown or given twice.",
    "401": "No credentials, or invalid ones.",
    "403": "Not allowed: a session request without its CSRF token, or an action your role may not take.",
    "404": "No such record, or not one you can see (both answer alike), or a page past the last one.",
    "406": "The Accept header asks for a media type this operation cannot produce.",
    "415": "The request body's media type is not one this operation accepts.",
    "422": "The request matches the schema but a rule refused it (e.g. an id you cannot see, a duplicate "
           "record number, a date in the future, a file that is not an image). Nothing was stored.",
    "429": "Too many requests; retry after the number of seconds in the Retry-After header.",
}
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
WITH_BODY = {"POST", "PUT", "PATCH"}


class ContractAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema plus every error status code an operation can answer, each with
    the one error body; pagination only for GET lists (an upload answers a plain array)."""

    def error_status_codes(self) -> list[str]:
        codes = ["400", "401", "406"]
        if self.method in UNSAFE:
            codes.append("403")
        if uritemplate_variables(self.path) or is_list_request(self.view, self.method):
            codes.append("404")
        if self.method in WITH_BODY:
            codes += ["415", "422"]
        if self.view.get_throttles():
            codes.append("429")
        return sorted(codes)

    def _get_paginator(self):
        return super()._get_paginator() if self.method == "GET" else None

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for code in self.error_status_codes():
            if code not in responses or "content" not in responses[code]:
                response = self._get_response_for_code(ErrorSerializer, code, ["application/json"], direction)
                response["description"] = responses.get(code, {}).get("description") or ERROR_DESCRIPTIONS[code]
                responses[code] = response
        return dict(sorted(responses.items()))


def uritemplate_variables(path: str) -> list[str]:
    return re.findall(r"{(\w+)}", path)


def postprocess_schema(result, generator, request, public):
    """Integer path ids are at least 1 (that is what the URL routes match)."""
    for item in result.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                if parameter.get("in") == "path" and schema.get("type") == "integer":
                    schema["minimum"] = 1
                if parameter.get("in") == "query" and schema.get("type") == "string" and not (
                        {"enum", "format", "pattern"} & set(schema)):
                    schema["pattern"] = NUL_FREE
                if parameter.get("in") == "query" and not parameter.get("required"):
                    parameter["allowEmptyValue"] = True
    return result


