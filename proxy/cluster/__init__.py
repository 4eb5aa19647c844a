"""The peer layer: which Detour of a site owns each blob, manifest and tag, and the routes
through it."""
