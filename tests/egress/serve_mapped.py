"""``interpreter serve`` with the test resolver: ``python -m tests.egress.serve_mapped``.

The mapping comes from TEST_EGRESS_RESOLVER (JSON: ``{"exempt": {name: [address, port]}, "answers":
{name: [address, ...]}}``), which only this module reads: the server itself has no way to be told.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial

from interpreter.__main__ import _serve
from interpreter.main import serve
from tests.egress.resolver import MappedResolver


def main() -> int:
    mapping = json.loads(os.environ["TEST_EGRESS_RESOLVER"])
    resolver = MappedResolver({name: (a, int(p)) for name, (a, p) in mapping.get("exempt", {}).items()},
                              mapping.get("answers", {}))  # fmt: skip
    return _serve(partial(serve, egress_resolver=resolver))


if __name__ == "__main__":
    sys.exit(main())
