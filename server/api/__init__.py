"""The REST API (``/api/v1``): request context helpers and one blueprint per resource."""
