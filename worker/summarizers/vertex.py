"""Whether the google-genai SDK is switched to Vertex AI, read without importing the SDK."""

from __future__ import annotations

import os


def vertex_requested() -> bool:
    """The SDK's own switch for Vertex AI (or its newer name) is on in the environment."""
    for name in ("GOOGLE_GENAI_USE_ENTERPRISE", "GOOGLE_GENAI_USE_VERTEXAI"):
        value = os.environ.get(name)
        if value is not None:
            return value.strip().lower() in ("1", "true")
    return False
