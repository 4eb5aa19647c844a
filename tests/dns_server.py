"""A tiny authoritative DNS server for the tests: ``python -m tests.dns_server RECORDS``.

Answers over UDP on ``--address`` (127.0.0.1) port ``--port`` (53) from ``RECORDS``, a JSON
file ``{"name": ["address", ...]}`` read again for every query, so a test moves the records by
rewriting the file (write it beside and ``os.replace``, so no query reads half of it):

* ``A`` (``AAAA``) of a name listed with IPv4 (IPv6) addresses: one record each, TTL 0;
* another type of a listed name: no records, NOERROR (what glibc's ``AAAA`` twin query of an
  ``A``-only name expects, at once rather than after a timeout);
* a name not listed, or listed with no addresses: NXDOMAIN.

Every query and answer is printed (flushed) to stdout, for the test's log.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from pathlib import Path
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A  # type: ignore[import-untyped]
from dnslib.server import DNSLogger, DNSServer  # type: ignore[import-untyped]


class FileResolver:
    """The records of a JSON file, as it is at each query."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> dict[str, list[str]]:
        try:
            loaded: dict[str, list[str]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {name.lower().rstrip("."): addresses for name, addresses in loaded.items()}

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        addresses = self.records().get(name)
        if not addresses:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for text in addresses:
            address = ipaddress.ip_address(text)
            if request.q.qtype == QTYPE.A and address.version == 4:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(text), ttl=0))
            elif request.q.qtype == QTYPE.AAAA and address.version == 6:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(text), ttl=0))
        return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args()
    logger = DNSLogger("request,reply,error", prefix=False, logf=lambda s: print(s, flush=True))
    server = DNSServer(FileResolver(args.records), args.address, args.port, logger=logger)
    print(f"listening on {args.address}:{args.port}", flush=True)
    server.start()


if __name__ == "__main__":
    main()
