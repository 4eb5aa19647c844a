"""The proxy itself: the HTTP app and its handlers, the upstream client and its egress policy,
the cache store, and the blob and manifest paths that join them."""
