"""Print the record tests/test_keys.py holds each stage's VERSION to: per stage, its
VERSION and the sha256 of every harness source it depends on.

    .tox/forgebench/bin/python scripts/stage_record.py > tests/stage_versions.json

Run it after changing a stage's sources, once VERSION is bumped wherever the change can
change what the stage produces.
"""

from __future__ import annotations

import json

from harness.plan import keys

if __name__ == "__main__":
    print(json.dumps(keys.stage_record(), indent=2, sort_keys=True))
