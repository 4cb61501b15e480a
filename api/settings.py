"""Node settings, read from the environment (every one in docs/settings.md)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Everything a node can be told. Each field is ``HERALD_<NAME>`` except the ``REDIS_*`` connection ones."""

    model_config = SettingsConfigDict(env_prefix="HERALD_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address the node listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the node listens on.")
    node_id: str = Field(
        default_factory=_default_node_id,
        pattern=r"^[A-Za-z0-9_.:@-]{1,100}$",
        description="Name of this node, sent as X-Node-Id on every response.",
    )
    replay_size: int = Field(1000, ge=1, description="Events kept per topic for resume.")
    replay_ttl: float = Field(3600, gt=0, description="Seconds an event is kept for resume.")
    heartbeat: float = Field(15, gt=0, description="Longest silence on an idle stream, in seconds.")
    retry_ms: int = Field(2000, ge=0, description="Reconnect delay hint sent to clients (retry:).")
    max_event_bytes: int = Field(65536, ge=1, description="Largest encoded data of one event, in bytes.")
    max_topics: int = Field(64, ge=1, description="Topics one connection may subscribe to.")
    client_buffer: int = Field(
        1024 * 1024, ge=1024, description="Bytes of unsent events one client may hold before it is cut off."
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest publish request body, in bytes.")
    max_connections: int = Field(
        0,
        ge=0,
        description="Open streams this node serves at most (0: no limit); past it, clients are told to retry.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Processes serving this node's port (SO_REUSEPORT), each with its own hub and broker feed;"
            " Redis broker only (with the embedded broker the node runs one)."
        ),
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL"),
        description="Redis to use as the broker; unset (and no REDIS_SENTINELS) runs the embedded broker.",
    )
    redis_sentinels: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_SENTINELS"),
        pattern=r"^\s*[^,:\s]+:[0-9]+\s*(,\s*[^,:\s]+:[0-9]+\s*)*$",
        description="Sentinels (host:port,host:port,...) that name the Redis primary; wins over REDIS_URL.",
    )
    redis_cluster_nodes: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_CLUSTER_NODES"),
        pattern=r"^\s*[^,:\s]+:[0-9]+\s*(,\s*[^,:\s]+:[0-9]+\s*)*$",
        description=(
            "Seed nodes (host:port,...) of a Redis Cluster to use as the broker (any node will do; a REDIS_URL"
            " naming a cluster node is detected at start without it). Herald's keys share one hash slot unless"
            ' HERALD_REDIS_PARTITIONS spreads the topics over several (docs/operations.md, "Redis deployments").'
        ),
    )
    redis_sentinel_master: str = Field(
        "herald",
        validation_alias=AliasChoices("REDIS_SENTINEL_MASTER"),
        min_length=1,
        description="The master name the sentinels monitor.",
    )
    redis_pool: int = Field(
        50, ge=1, description="Redis connections for commands; more concurrent commands wait for one."
    )
    redis_partitions: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Partitions the topics are spread over, each its own data set in its own hash slot (on a Redis Cluster:"
            " spread over the shards). A deployment constant: every node and producer must use the same. 1: one"
            ' data set, ids are integers; more: clients\' ids are cursors (docs/operations.md, "Redis deployments").'
        ),
    )
    redis_read_replicas: bool = Field(
        False,
        description=(
            "On a Redis Cluster: read the live feed and resumes from a replica of each shard (the first one; the"
            " primary when a shard has none), so a reconnect storm's reads leave the primaries to publishing."
            " Publishing, and a reconnecting feed's catch-up, stay on the primary."
        ),
    )
    redis_replicas_ack: int = Field(
        0,
        ge=0,
        description="Replicas that must have an event before its publish is answered 201 (Redis WAIT).",
    )
    # -- access control (api.auth): on when one key is configured -------------
    jwt_secret: SecretStr | None = Field(
        None, description="HMAC secret (at least 32 bytes) that signs access tokens; turns access control on."
    )
    jwt_public_key: str | None = Field(
        None, description="PEM public key (or @/path/to/key.pem) that verifies access tokens; turns access control on."
    )
    jwks_url: str | None = Field(
        None,
        description="JSON Web Key Set URL (keys by kid, fetched again on an unknown kid); turns access control on.",
    )
    jwt_algorithms: str | None = Field(
        None,
        description="Accepted token algorithms, comma-separated (default HS256 with a secret, RS256,ES256,EdDSA"
        " with public keys); never none, never HMAC with a public key.",
    )
    jwt_audience: str | None = Field(None, description="When set, tokens must carry this aud.")
    jwt_issuer: str | None = Field(None, description="When set, tokens must carry this iss.")
    jwt_leeway: float = Field(
        30,
        ge=0,
        le=300,
        description="Seconds of clock leeway for nbf and iat (exp is exact: streams end at it).",
    )
    jwt_cookie: str = Field(
        "herald_token",
        pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$",
        description="Cookie a subscriber's token may come in (after the Authorization header and ?access_token=).",
    )
    public_topics: str = Field(
        "",
        description="Topic selectors anyone may subscribe to without a token, comma-separated (default: none).",
    )
    cors_origins: str = Field(
        "",
        description="Origins whose pages may use /events and /publish (CORS, with credentials), comma-separated.",
    )
    # -- the Mercure hub (api.mercure) at /.well-known/mercure: tokens need a key and HERALD_MERCURE_AUDIENCE --
    mercure_audience: str | None = Field(
        None,
        description="The Mercure hub's resource identifier, the aud its access tokens must carry (e.g."
        " https://hub.example.com/.well-known/mercure; its origin is also the hub URL relative topics resolve"
        " against). Unset: no Mercure token is valid (publishing is refused).",
    )
    mercure_issuers: str = Field(
        "",
        description="Issuers (iss) whose Mercure access tokens the hub accepts, comma-separated"
        " (default: no iss check: self-issued tokens, bound to the hub by their aud).",
    )
    mercure_anonymous: bool = Field(
        False,
        description="Let Mercure subscribers without a token in (they receive public updates only).",
    )
    mercure_cookie: str = Field(
        "__Secure-mercure_access_token",
        pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$",
        description="Cookie a Mercure client's token may come in (after the Authorization header and"
        " ?access_token=); the legacy mercureAuthorization is read too.",
    )
    mercure_subscriptions: bool = Field(
        False,
        description="Mercure active subscriptions: publish a private subscription update when a subscription"
        " starts or ends, and list the cluster's subscriptions at /.well-known/mercure/subscriptions"
        " (a broker write per subscription at connect and disconnect, so off unless asked for).",
    )
    mercure_native: bool = Field(
        True,
        description="Also deliver every public Mercure update on the native API: to /events subscribers of each of"
        " its topics that is a valid native topic name (as a native event of that topic, data as is).",
    )
    # -- operations (api.core.metrics, api.node.registry, api.node.logs) ----------------------
    metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics (counted per flush, not per event).")
    metrics_public: bool = Field(
        False, description="With access control on, let /metrics be scraped without an admin token."
    )
    node_url: str | None = Field(
        None,
        description="This node's own URL as the cluster registry shows it (default http://HOST:PORT).",
    )
    log_format: Literal["text", "json"] = Field("text", description="Log lines as text, or as one JSON object each.")
    uvicorn_adapter: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Herald's HTTP adapter onto uvicorn's internals (api.adapter): auto uses it only with a uvicorn"
        " it was tested with, else stock uvicorn and the ASGI app (correct, slower); on always; off never.",
    )
    header_timeout: float = Field(
        10, gt=0, description="Seconds a connection has to send a complete request head (then it is closed)."
    )
    body_timeout: float = Field(
        20, gt=0, description="Seconds a request body may go without a byte (then 408 and the connection is closed)."
    )
    max_request_line: int = Field(
        16384, ge=1024, description="Bytes of a request line at most (longer: 414); 64 topics of 200 characters fit."
    )
    max_header_bytes: int = Field(
        32768, ge=4096, description="Bytes of a request's whole head (request line and headers) at most (else 431)."
    )
    max_sockets: int = Field(
        0,
        ge=0,
        description="Open sockets one node serves at most, streams and requests alike (0: its open-files limit less"
        " a reserve); past it the oldest connection still waiting for its request is closed to make room.",
    )
    replay_max_bytes: int = Field(
        0,
        ge=0,
        description="Bytes the embedded broker's whole replay buffer holds at most, oldest events dropped first"
        " (0: an eighth of the machine's memory). With Redis, Redis bounds it (maxmemory, stream trimming).",
    )

    @model_validator(mode="after")
    def _limits_agree(self) -> Settings:
        """Limits that contradict each other are refused at start, not discovered by a client."""
        if self.client_buffer < self.max_event_bytes + 1024:
            raise ValueError(
                f"HERALD_CLIENT_BUFFER ({self.client_buffer}) must hold one event of HERALD_MAX_EVENT_BYTES"
                f" ({self.max_event_bytes}) and its frame: at least {self.max_event_bytes + 1024}"
            )
        if self.max_header_bytes < self.max_request_line:
            raise ValueError("HERALD_MAX_HEADER_BYTES must be at least HERALD_MAX_REQUEST_LINE")
        return self

    def replay_ceiling(self) -> int:
        """:attr:`replay_max_bytes`, or its default: an eighth of this machine's physical memory."""
        if self.replay_max_bytes:
            return self.replay_max_bytes
        try:
            memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            memory = 8 * 1024**3
        return max(64 * 1024**2, memory // 8)
