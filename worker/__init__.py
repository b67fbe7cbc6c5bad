"""session-consolidator: archive, summarize and slim AI agents' Redis conversation state."""

__version__ = "0.1.0"
