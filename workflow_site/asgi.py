"""ASGI entry point for daphne: HTTP through Django, websockets through channels."""

import os

from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflow_site.settings")
django_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the app registry)

from pipelines.consumers import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {"http": django_app, "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns))}
)
