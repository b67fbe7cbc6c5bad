"""The layout a configuration names."""

from __future__ import annotations

from worker.config import LayoutName, Settings
from worker.layouts.adk import AdkLayout
from worker.layouts.base import Layout
from worker.layouts.gemini import GeminiLayout
from worker.layouts.langchain import LangChainLayout
from worker.layouts.listlayout import ListLayout
from worker.layouts.llamaindex import LlamaIndexLayout


class UnknownLayout(ValueError):
    pass


def layout_for(settings: Settings) -> Layout:
    match settings.layout:
        case LayoutName.LIST:
            return ListLayout(newest_first=settings.newest_first)
        case LayoutName.GEMINI:
            return GeminiLayout()
        case LayoutName.LANGCHAIN:
            return LangChainLayout()
        case LayoutName.ADK:
            return AdkLayout()
        case LayoutName.LLAMAINDEX:
            return LlamaIndexLayout()
    raise UnknownLayout(f"layout {settings.layout.value!r} is not available in this build")
