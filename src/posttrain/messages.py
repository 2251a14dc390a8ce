"""Chat messages as the user's data gave them, with nothing but the standard library.

Its own module, outside `posttrain.data`, because the reward functions' child process imports it
(`rewards.user_functions`, which that child loads by path): importing anything under `posttrain.data` runs the
package's `__init__`, which imports torch and datasets, seconds of every child's start, counted against
`reward.timeout_s` (tests/unit/test_reward_process.py checks what the child imports).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical message as the user's data gave it: the keys it had (none of those Arrow's one schema adds as
    None), its tool calls a list again, not the JSON text rows keep them as."""
    plain = {k: v for k, v in message.items() if v is not None}
    if isinstance(plain.get("tool_calls"), str):
        plain["tool_calls"] = json.loads(plain["tool_calls"])
    return plain
