"""The layout a configuration names."""

from __future__ import annotations

from worker.config import LayoutName, Settings
from worker.layouts.base import Layout
from worker.layouts.listlayout import ListLayout


class UnknownLayout(ValueError):
    pass


def layout_for(settings: Settings) -> Layout:
    if settings.layout is LayoutName.LIST:
        return ListLayout(newest_first=settings.newest_first)
    raise UnknownLayout(f"layout {settings.layout.value!r} is not available in this build")
