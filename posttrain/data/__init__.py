"""The data layer every training stage shares: sources, formats, mixtures, validation."""
