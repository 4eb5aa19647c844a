"""The way out: the upstream client, auth and tokens, each hop, egress, TLS, peers checked."""
