"""Blobs and manifests: hits, one shared fetch per blob, its clients, what a request came to."""
