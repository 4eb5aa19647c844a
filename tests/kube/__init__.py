"""A real one-node Kubernetes for the tests: control plane, containerd with CRI, a kubelet.

See ``cluster.py``; the binaries come from ``$DETOUR_K8S_ASSETS`` (``.ci/run`` sets it).
"""
