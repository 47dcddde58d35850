"""The operator console: web pages, REST API, Prometheus metrics and health checks over HTTP.

``dicomnode serve`` runs it in the node process (:class:`dicomnode.console.server.ConsoleServer`)
from the ``[http]`` settings. Everything it shows is read from the database and the store through
:mod:`dicomnode.console.queries`, so every edge of a multi-node site can serve it from the shared
database. Modules: ``app`` (routes and middleware), ``pages`` (HTML), ``api`` (JSON under /api/v1/),
``auth`` and ``passwords`` (login, bearer token, CSRF), ``audit`` (operator actions), ``metrics``,
``health``, ``thumbnails``, ``ruletester``.
"""
