"""Runs a user's `grade(sample, item)` inside the python grader's child process (started by
`posttrain.rewards.graders.python_grader`, never imported by it).

Before the user's code is even compiled it: caps memory, CPU time and file size with setrlimit; moves
into fresh user and network namespaces where the kernel allows it (then no interface but a down
loopback exists); replaces every socket constructor with one that raises, which also covers kernels
without namespaces. Then it reads one JSON request per line from stdin and writes one JSON reply per line.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000


def limit_resources(memory_mb: int, cpu_s: int) -> None:
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def isolate_network() -> bool:
    """Enter new user + network namespaces (Linux); False where the kernel or container refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0
    except (OSError, AttributeError):
        return False


def block_sockets() -> None:
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the grader sandbox")

    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def reply(channel, payload) -> None:
    channel.write(json.dumps(payload) + "\n")
    channel.flush()


def main() -> None:
    setup = json.loads(sys.stdin.readline())
    isolate_network()
    block_sockets()
    # The protocol keeps the real stdout; user prints go to stderr (discarded by the parent).
    channel = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr
    limit_resources(setup["memory_mb"], setup["cpu_s"])
    scope = {"__name__": "grader"}
    try:
        exec(compile(setup["source"], "<grader source>", "exec"), scope)
        grade = scope["grade"]
    except BaseException as err:  # noqa: BLE001 - any failure of user code is reported, not raised
        reply(channel, {"fatal": f"{type(err).__name__}: {err}"})
        return
    for line in sys.stdin:
        request = json.loads(line)
        try:
            value = grade(request["sample"], request["item"])
        except BaseException as err:  # noqa: BLE001 - includes MemoryError, SystemExit, KeyboardInterrupt
            reply(channel, {"error": f"{type(err).__name__}: {err}"})
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            reply(channel, {"error": f"grade returned {type(value).__name__}, not a number"})
        else:
            reply(channel, {"value": float(value)})


if __name__ == "__main__":
    main()
