"""Proof that a request, or a tag's answer, comes from a Detour of the site: a shared secret.

With ``cluster.secret_dir`` set, the peers of a site share a secret (a Kubernetes Secret
mounted into the DaemonSet and the hub; ``detour peer-secret`` makes one). In that directory:

* ``current`` signs what this instance sends, and is accepted;
* ``accepted``, if present, is accepted too: the other secret while one is being rotated.

Both are read again every ``cluster.refresh`` (a mounted Secret changes in place), so a secret
is rotated without downtime: ``accepted`` := new (every peer accepts both), then ``current`` :=
new and ``accepted`` := old (peers sign with the new one, the old still accepted), then
``accepted`` goes (docs/security.md).

A peer request carries :data:`PROOF_HEADER`: ``<unix time>:<HMAC-SHA256>`` over the method,
the path and query as sent, the time and the peer's name (its ``advertise``), valid within
:data:`PROOF_SECONDS` of this instance's clock. A request without a valid proof is a client's,
whatever its source address. The owner's answer to a tag (the one thing a peer says that can't
be checked against a digest) carries a proof too, over the request's proof, the status, the
``Docker-Content-Digest`` and the ``Age``; a tag's answer without it is not taken.

Without ``cluster.secret_dir``, a peer is known by its source address alone, as the peer set
resolves it, and tags are taken from any peer: no proofs are made or asked for.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from proxy.logs import get_logger

# Marks a request from one of the site's Detours to another (see proxy.cluster.peering), and
# carries the proof that it is one.
PEER_HEADER = "X-Detour-Peer"
# On a peer's request for a layer: the layer's place in its image (proxy.cluster.layers).
TREE_HEADER = "X-Detour-Tree"
# On the refusal of a request that has already passed through this Detour: to a peer that
# sent it, no answer for its client, but a sign to go on to its next source.
LOOP_HEADER = "X-Detour-Loop"
PROOF_HEADER = "X-Detour-Peer-Proof"
PROOF_SECONDS = 300.0  # how far a request's time may be from this instance's clock
SIGNING_FILE = "current"
ACCEPTED_FILE = "accepted"
MIN_SECRET_CHARS = 32  # `detour peer-secret` makes 64 hex characters
REFUSAL_LOG_SECONDS = 60.0  # at most one warning a minute for requests with a bad proof

log = get_logger("detour.cluster")


def new_secret() -> str:
    """A fresh secret for ``cluster.secret_dir``'s files: 32 random bytes, in hex."""
    return secrets.token_hex(32)


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def fingerprint(key: bytes) -> str:
    """What a log line says of a secret: enough to tell two apart, nothing to guess it by."""
    return hashlib.sha256(b"detour-peer-fingerprint\n" + key).hexdigest()[:12]


class PeerAuth:
    """The site's secrets as read from ``cluster.secret_dir``, and the proofs made of them."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._signing: bytes | None = None
        self._accepted: tuple[bytes, ...] = ()
        self._read_once = False
        self._last_refusal_log = 0.0
        self.load()

    @property
    def required(self) -> bool:
        """Whether peers prove themselves (``cluster.secret_dir`` is set)."""
        return self.directory is not None

    @property
    def signing(self) -> bool:
        """Whether there is a secret to sign with (``current`` was read)."""
        return self._signing is not None

    def load(self) -> None:
        """Read the secrets again; log when they changed (by fingerprint), or are missing."""
        if self.directory is None:
            return
        signing = self._read(SIGNING_FILE)
        accepted = tuple(k for k in (signing, self._read(ACCEPTED_FILE)) if k is not None)
        if self._read_once and (signing, accepted) == (self._signing, self._accepted):
            return
        self._signing, self._accepted, self._read_once = signing, accepted, True
        if signing is None:
            log.error(
                "peer_secret_missing",
                file=str(self.directory / SIGNING_FILE),
                action="every peer request is treated as a client's and no tag is taken from "
                "a peer until it exists (detour peer-secret makes one)",
            )
            return
        log.info(
            "peer_secret_loaded",
            current=fingerprint(signing),
            accepted=[fingerprint(key) for key in accepted],
        )

    def _read(self, name: str) -> bytes | None:
        assert self.directory is not None
        try:
            text = (self.directory / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("peer_secret_unreadable", file=name, error=type(exc).__name__)
            return None
        if not text:
            return None
        if len(text) < MIN_SECRET_CHARS:
            log.error(
                "peer_secret_too_short",
                file=name,
                chars=len(text),
                minimum=MIN_SECRET_CHARS,
                action="not used; detour peer-secret makes one",
            )
            return None
        return text.encode()

    # ----------------------------------------------------------------- requests

    def sign_request(self, method: str, target: str, peer: str) -> str | None:
        """The proof for a request to a peer (``target``: path and query as sent), or None
        without a secret to sign with."""
        if self._signing is None:
            return None
        now = str(int(time.time()))
        return f"{now}:{_mac(self._signing, 'request', method, target, now, peer)}"

    def check_request(
        self, method: str, target: str, peer: str, proof: str | None, remote: str | None
    ) -> bool:
        """Whether ``proof`` shows the request was made with one of the accepted secrets,
        lately. A bad one is logged (at most once a minute)."""
        if proof is not None and self._valid_request(method, target, peer, proof):
            return True
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_SECONDS:
            self._last_refusal_log = now
            log.warning(
                "peer_proof_refused",
                remote=remote,
                proof="missing" if proof is None else "invalid or expired",
                action="treated as a client's request (docs/security.md)",
            )
        return False

    def _valid_request(self, method: str, target: str, peer: str, proof: str) -> bool:
        stamp, _, mac = proof.partition(":")
        if not stamp.isdigit() or len(stamp) > 12:
            return False
        if abs(time.time() - int(stamp)) > PROOF_SECONDS:
            return False
        return any(
            hmac.compare_digest(_mac(key, "request", method, target, stamp, peer), mac)
            for key in self._accepted
        )

    # ----------------------------------------------------------------- tag answers

    def sign_answer(self, request_proof: str, status: int, headers: Mapping[str, str]) -> str:
        """The proof for an answer to a peer's request that carried ``request_proof``."""
        assert self._signing is not None, "answers are signed only for proven requests"
        return _mac(self._signing, "answer", request_proof, *_answer_parts(status, headers))

    def check_answer(
        self, request_proof: str | None, status: int, headers: Mapping[str, str]
    ) -> bool:
        """Whether a peer's answer carries proof, bound to our request's, of an accepted
        secret."""
        proof = headers.get(PROOF_HEADER)
        if request_proof is None or proof is None:
            return False
        parts = _answer_parts(status, headers)
        return any(
            hmac.compare_digest(_mac(key, "answer", request_proof, *parts), proof)
            for key in self._accepted
        )


def _answer_parts(status: int, headers: Mapping[str, str]) -> tuple[str, str, str]:
    return str(status), headers.get("Docker-Content-Digest", ""), headers.get("Age", "")
