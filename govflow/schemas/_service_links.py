"""The environment variables Kubernetes gives a pod for each Service of its namespace.

Unless a pod says ``enableServiceLinks: false``, the kubelet adds, for every Service with a
cluster IP (the name upper-cased, ``-`` made ``_``; ``GOVFLOW_API`` for ``govflow-api``)::

    GOVFLOW_API_SERVICE_HOST=10.0.0.11
    GOVFLOW_API_SERVICE_PORT=80                    the first port
    GOVFLOW_API_SERVICE_PORT_HTTP=80               each named port
    GOVFLOW_API_PORT=tcp://10.0.0.11:80            the first port, as Docker links had it
    GOVFLOW_API_PORT_80_TCP=tcp://10.0.0.11:80     then, for each port,
    GOVFLOW_API_PORT_80_TCP_PROTO=tcp
    GOVFLOW_API_PORT_80_TCP_PORT=80
    GOVFLOW_API_PORT_80_TCP_ADDR=10.0.0.11

(``makeLinkVariables`` in kubernetes/pkg/kubelet/envvars). A Service whose name starts with
``govflow`` thus puts ``GOVFLOW_*`` names in every pod; settings ignore a name only when
both it and its value have one of these shapes, so a misspelt setting is still refused.
"""

from __future__ import annotations

import re

# A Service name is a DNS-1035 label, a port name an IANA service name (a letter somewhere).
_SERVICE = r"[A-Z](?:[A-Z0-9_]*[A-Z0-9])?"
_PORT_NAME = r"[A-Z0-9](?:[A-Z0-9_]*[A-Z0-9])?"
_PORT_OF = rf"{_SERVICE}_PORT_[1-9][0-9]{{0,4}}_(?:TCP|UDP|SCTP)"
_NUMBER = r"[1-9][0-9]{0,4}"
_IP = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:.]*"
_LINK = rf"(?:tcp|udp|sctp)://(?:[0-9]{{1,3}}(?:\.[0-9]{{1,3}}){{3}}|\[[0-9a-fA-F:.]+\]):{_NUMBER}"

_SHAPES = tuple(
    (re.compile(name), re.compile(value))
    for name, value in (
        (rf"{_SERVICE}_SERVICE_HOST", _IP),
        (rf"{_SERVICE}_SERVICE_PORT(?:_{_PORT_NAME})?", _NUMBER),
        (rf"{_SERVICE}_PORT", _LINK),
        (_PORT_OF, _LINK),
        (rf"{_PORT_OF}_PROTO", r"tcp|udp|sctp"),
        (rf"{_PORT_OF}_PORT", _NUMBER),
        (rf"{_PORT_OF}_ADDR", _IP),
    )
)


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is one Kubernetes sets for a Service (see the module doc)."""
    return any(n.fullmatch(name) and v.fullmatch(value) for n, v in _SHAPES)
