"""Where each layer of an image stands in its image, so that a site's trees for one image's
layers take turns: every node is a parent in about as many of them as every other.

A blob's tree (:meth:`proxy.cluster.peering.Peering.ahead`) is laid over a rendezvous order of
the site's nodes. Laid over each layer's own digest, the orders are independent draws, and a
rollout lasts as long as its busiest node's upload: a node that happens to be a parent in most
of an image's layers sends ``fan_out`` times each of them, while the node that is a leaf in all
of them sends nothing (1.75x the image for the busiest of 12 nodes at ``fan_out`` 3, 8 layers;
docs/fan-out.md). Laid over one order per *image* instead (the rendezvous order of the image
manifest's digest), turned for layer ``i`` by ``i`` times the number of parents a tree has, the
parents of consecutive layers are different nodes, and the upload evens out (about 1.1x).

Every node of a rollout computes the same trees alone: it has served the image's manifest to
its own client before the client asks for a layer (:meth:`ImageLayers.note`; the last
:data:`~proxy.memory.LAYER_PLACES` layers), and a node asked
for a layer by a peer takes the layer's place from the peer's request (:data:`TREE_HEADER`),
so a node that never saw the manifest places itself in the same tree. A layer this node knows
no image for (a blob fetched alone, or a place forgotten) goes by its own digest.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass

from proxy.memory import LAYER_PLACES
from proxy.upstream.peer_auth import TREE_HEADER

__all__ = ["TREE_HEADER", "ImageLayers", "Place"]

MAX_LAYERS = 1000  # an image manifest with more layers is not placed (registries allow ~128)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Place:
    """Layer ``index`` of the image manifest ``image`` (a digest)."""

    image: str
    index: int

    def header(self) -> str:
        """The :data:`TREE_HEADER` value: ``<manifest digest> <index>``."""
        return f"{self.image} {self.index}"

    @classmethod
    def parse(cls, value: str | None) -> Place | None:
        """A :data:`TREE_HEADER` value, or None when it is missing or malformed."""
        if value is None:
            return None
        image, _, index = value.partition(" ")
        if not _DIGEST.fullmatch(image) or not index.isdigit() or len(index) > 4:
            return None
        return cls(image, int(index))


class ImageLayers:
    """The place of each layer of the image manifests this node served lately."""

    def __init__(self, kept: int = LAYER_PLACES) -> None:
        self._kept = kept
        self._places: OrderedDict[str, Place] = OrderedDict()

    def note(self, digest: str, body: bytes) -> None:
        """Remember the layers of the image manifest ``body`` (``digest``); anything else (an
        index, a body that is not JSON) is left alone."""
        if not _DIGEST.fullmatch(digest):
            return
        try:
            layers = json.loads(body).get("layers")
        except (ValueError, AttributeError):
            return
        if not isinstance(layers, list) or not 0 < len(layers) <= MAX_LAYERS:
            return
        for index, layer in enumerate(layers):
            blob = layer.get("digest") if isinstance(layer, dict) else None
            if isinstance(blob, str) and _DIGEST.fullmatch(blob):
                self._places[blob] = Place(digest, index)
                self._places.move_to_end(blob)
        while len(self._places) > self._kept:
            self._places.popitem(last=False)

    def place(self, blob: str) -> Place | None:
        return self._places.get(blob)
