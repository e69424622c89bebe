"""ASGI entry point for daphne: HTTP through Django, websockets through channels.

Websocket handshakes are not covered by CSRF protection and browsers send cookies with them
from any page, so the router accepts only an ``Origin`` whose host is in ``ALLOWED_HOSTS``
(``AllowedHostsOriginValidator``); any other origin, or none, is refused before routing.
"""

import os

from channels.routing import ProtocolTypeRouter, URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflow_site.settings")
django_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the app registry)

from pipelines.consumers import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
