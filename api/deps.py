"""FastAPI dependencies: the node's parts, built in the lifespan and read from app.state.

They are ``async def`` although they never await: FastAPI runs a plain
``def`` dependency in a worker thread, a thread hop per dependency per
request, which made 5,000 simultaneous connects take seconds.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.auth.access import Access
from api.auth.cors import Cors
from api.auth.credentials import subscriber_token
from api.core.hub import Hub
from api.settings import Settings
from broker.base import Broker


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


async def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


async def get_access(request: Request) -> Access:
    access: Access = request.app.state.access
    return access


async def require_admin(request: Request) -> None:
    """Operational routes (/stats, ...): with access control on, a token with ``"admin": true``.

    The token may come as for a subscriber (header, ``access_token``, cookie): an operator's browser reads these.
    """
    access: Access = request.app.state.access
    if access.enabled:
        settings: Settings = request.app.state.settings
        headers = request.scope["headers"]
        cors: Cors = request.app.state.cors
        token = subscriber_token(
            headers, request.query_params.multi_items(), settings.jwt_cookie, cors.trusts_ambient_credentials(headers)
        )
        await access.authorize_admin(token)


SettingsDep = Annotated[Settings, Depends(get_settings)]
BrokerDep = Annotated[Broker, Depends(get_broker)]
HubDep = Annotated[Hub, Depends(get_hub)]
AccessDep = Annotated[Access, Depends(get_access)]
AdminOnly = Depends(require_admin)
