"""The admission webhook that adds the node-local prefix to pod images; it shares only
reference parsing, settings and logging with the proxy."""
