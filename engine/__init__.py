"""Layer-1 engine: segment 1A (merchants -> outlet_catalogue) and 1B (outlets -> site_locations)."""

__version__ = "0.1.0"
