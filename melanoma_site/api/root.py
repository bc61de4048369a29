"""The API root (/api/v1/): every top-level collection of both apps, with its URL."""
from collections import OrderedDict

from django.urls import NoReverseMatch, reverse
from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.response import Response

from . import ContractMixin

def collections() -> "OrderedDict[str, str]":
    """Every top-level collection: {name: URL name}, from the routers of both apps."""
    from inference.api.urls import router as inference_router
    from patients.api.urls import router as patients_router

    out = OrderedDict()
    for namespace, router in (("api:", patients_router), ("", inference_router)):
        for prefix, _viewset, basename in router.registry:
            out[prefix] = f"{namespace}{basename}-list"
    return out


class APIRootSerializer(serializers.Serializer):
    def get_fields(self):
        return {name: serializers.URLField(read_only=True) for name in collections()}


@extend_schema(summary="Every collection of the API, with its URL", tags=["root"], responses=APIRootSerializer)
class APIRootView(ContractMixin, generics.GenericAPIView):
    serializer_class = APIRootSerializer
    pagination_class = None
    filter_backends = []

    def get(self, request, *args, **kwargs):
        data = OrderedDict()
        for name, url_name in collections().items():
            try:
                data[name] = request.build_absolute_uri(reverse(url_name))
            except NoReverseMatch:  # pragma: no cover -- a router without a list route
                continue
        return Response(data)

