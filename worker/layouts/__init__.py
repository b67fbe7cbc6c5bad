"""Hot-tier layouts: how an agent library's stored state decodes into turns and back."""
