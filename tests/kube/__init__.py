"""A real one-node Kubernetes for the tests: control plane, containerd with CRI, a kubelet.

See ``cluster.py``; the binaries come from ``$K8S_TEST_ASSETS`` (``.ci/run`` sets it).
"""
