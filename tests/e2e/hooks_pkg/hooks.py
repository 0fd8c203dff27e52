"""A user's pycromanager hook, as a lab would write one: it logs every event it sees."""

from __future__ import annotations

import json
import os
from typing import Any


def log_event(event: Any) -> Any:
    with open(os.environ["SCOPESTREAM_HOOK_LOG"], "a") as f:
        f.write(json.dumps(event if isinstance(event, list) else [event]) + "\n")
    return event
