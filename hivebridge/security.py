"""What users may point the bridge at: endpoint keys from its environment, endpoint hosts.

Trusted users add endpoints from a room. Without these rules one could name any
variable of the bridge's environment as the key (``env:HIVEBRIDGE_AS_TOKEN``)
and have it sent to a URL of their choosing, or point the bridge at a service
only it can reach (loopback, the LAN, a cloud's metadata address). The rules:

- ``env:VAR`` names only variables the operator allowed (``security.
  endpoint_key_env_prefix`` or ``security.endpoint_key_env``), and never one
  that holds a secret of the bridge, whatever the config says;
- an endpoint's host must resolve to public addresses only, unless the operator
  allowed it (``security.private_endpoint_hosts``) or an owner said so.

The policy is checked when an endpoint is added and again at every start. A name
whose DNS answer changes afterwards is not checked again (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from .config import ENV_OVERRIDES, SecurityConfig

_ENV_REF = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")
#: Seconds a host name gets to resolve when an endpoint is checked.
RESOLVE_TIMEOUT_S = 5.0
#: A secret shorter than this is not looked for inside other values (too many false hits).
_MIN_SECRET_LEN = 8

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(ValueError):
    """The policy refuses; the message is one line fit for a room, with no secret in it."""


def env_reference(raw: str | None) -> str | None:
    """The variable ``raw`` names when it is ``env:NAME``; None for a literal key."""
    match = _ENV_REF.match(raw or "")
    return match.group(1) if match else None


class EndpointPolicy:
    """Decides which keys may be sent and which hosts may be called."""

    def __init__(
        self,
        config: SecurityConfig,
        own_secrets: Iterable[str | None],
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``own_secrets``: values that must never leave the bridge (its tokens, the
        database URL); the values of its own ``HIVEBRIDGE_*`` settings are added."""
        self.config = config
        self.env = os.environ if env is None else env
        values = {s for s in own_secrets if s}
        values |= {v for name in ENV_OVERRIDES if (v := self.env.get(name))}
        self._secrets = frozenset(values)

    # --- keys ---------------------------------------------------------------------------

    def may_name(self, variable: str) -> bool:
        """Whether ``env:variable`` is allowed by the config (values not looked at)."""
        if variable in ENV_OVERRIDES:
            return False
        prefix = self.config.endpoint_key_env_prefix
        return variable in self.config.endpoint_key_env or bool(
            prefix and variable.startswith(prefix) and len(variable) > len(prefix)
        )

    def is_own_secret(self, value: str) -> bool:
        """Whether ``value`` is, holds or is part of a secret of the bridge."""
        for secret in self._secrets:
            if value == secret:
                return True
            if len(secret) >= _MIN_SECRET_LEN and secret in value:
                return True
            if len(value) >= _MIN_SECRET_LEN and value in secret:
                return True
        return False

    def resolve_key(self, raw: str | None) -> str | None:
        """The key to send for what a user gave: a literal key, or ``env:NAME`` read
        from the environment when allowed; raises :class:`Refused` otherwise."""
        if not raw:
            return None
        variable = env_reference(raw)
        if variable is None:
            if self.is_own_secret(raw):
                raise Refused("That key is a secret of the bridge; it is never sent anywhere.")
            return raw
        if not self.may_name(variable):
            raise Refused(self.env_rule(variable))
        value = self.env.get(variable)
        if not value:
            raise Refused(f"{variable} is not set in the bridge's environment.")
        if self.is_own_secret(value):
            raise Refused(f"{variable} holds a secret of the bridge; it is never sent anywhere.")
        return value

    def env_rule(self, variable: str) -> str:
        """Why ``env:variable`` is refused, and what is allowed instead."""
        allowed = []
        if self.config.endpoint_key_env_prefix:
            allowed.append(f"variables starting {self.config.endpoint_key_env_prefix}")
        allowed += self.config.endpoint_key_env
        what = ", ".join(allowed) if allowed else "none (the operator allowed none)"
        return (
            f"env:{variable[:60]} is not allowed: keys may come only from the variables "
            f"the operator allowed in security.endpoint_key_env*: {what}."
        )

    # --- hosts --------------------------------------------------------------------------

    def host_allowed(self, host: str, addresses: Iterable[IPAddress] = ()) -> bool:
        """Whether the config allows ``host`` (by name) or all of ``addresses``."""
        host = host.lower().rstrip(".")
        networks = []
        for entry in self.config.private_endpoint_hosts:
            if entry.lower().rstrip(".") == host:
                return True
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue
        found = list(addresses)
        return bool(found) and all(any(a in n for n in networks) for a in found)

    async def check_url(self, url: str, *, allow_private: bool = False) -> None:
        """Refuse a URL whose host is loopback, private, link-local or otherwise not
        public, unless the config or ``allow_private`` (an owner's word) allows it."""
        host = urlsplit(url).hostname
        if not host:
            raise Refused("The URL has no host.")
        if allow_private:
            return
        addresses = await resolve(host)
        if not addresses:
            raise Refused(f"{host[:80]} does not resolve to an address.")
        private = [a for a in addresses if not is_public(a)]
        if not private or self.host_allowed(host, addresses):
            return
        raise Refused(
            f"{host[:80]} is a private address ({private[0]}): an owner may add it with "
            "--private, or the operator allow it in security.private_endpoint_hosts."
        )


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast; loopback, private, link-local (169.254.169.254),
    shared, reserved, multicast and unspecified addresses are not."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def resolve(host: str) -> list[IPAddress]:
    """Every address ``host`` names (an address literal names itself); [] when it does
    not resolve in :data:`RESOLVE_TIMEOUT_S`."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, proto=socket.IPPROTO_TCP), RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError, UnicodeError):
        return []
    found: list[IPAddress] = []
    for info in infos:
        try:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return found
