"""Schemathesis hooks for scripts/test-schemathesis.sh.

`batch` and `stream` as a user ID select the literal paths
/api/v2/presence/batch and /api/v2/presence/stream, which OpenAPI matches
before /api/v2/presence/{userID}. They are described, and tested, as their
own operations; as a {userID} they would be checked against the wrong one.
Schemathesis draws strings from the spec, so it does send them.
"""

import schemathesis

LITERAL_PATHS = {"batch", "stream"}


@schemathesis.hook
def filter_case(context, case):
    return (case.path_parameters or {}).get("userID") not in LITERAL_PATHS
