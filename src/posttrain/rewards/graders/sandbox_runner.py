"""Runs a user's `grade(sample, item)` inside the python grader's child process (started by
`posttrain.rewards.graders.python_grader` as `python -I sandbox_runner.py <result fd>`, never imported by it).

Three processes, so that a kill reaches everything the grader started:
- the runner (the process the trainer started, in a session of its own) enters fresh user, network and
  PID namespaces where the kernel allows it, forks the namespace's init and waits for it, then exits with the
  worker's status (128 + its signal where one killed it); the runner and the init die with their parents
  (PR_SET_PDEATHSIG, and each exits at once where its parent died before that was set), so a trainer killed
  mid-grade leaves no sandbox behind;
- the init (PID 1 of the new namespace) forks the worker and reaps every orphan until the worker exits; when
  the init dies (the worker exited, or the trainer killed the runner's process group on a timeout) the kernel
  kills every process left in the namespace, including one that moved to a session of its own;
- the worker caps its resources (memory, CPU time, file size, process count), makes the file system
  read-only except its temp directory (Landlock), replaces the socket constructors, and only then compiles
  the user's code. It reads one JSON request per line from stdin and writes each reply, tagged with the
  request's id, to the result pipe: fd 1 and fd 2 belong to the user's code (the trainer keeps them as the
  error record).
"""

import ctypes
import json
import os
import resource
import sys
import traceback

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446  # all Linux arches
# Landlock filesystem rights that change the file system (uapi/linux/landlock.h); reading stays allowed.
LANDLOCK_WRITE = {1: (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)
                  | (1 << 11) | (1 << 12),  # write, remove dir/file, make char/dir/reg/sock/fifo/block/sym
                  2: 1 << 13,  # ABI 2: refer (rename or link across directories)
                  3: 1 << 14}  # ABI 3: truncate
LANDLOCK_SCOPE_SIGNAL = 1 << 1  # ABI 6: no signals to processes outside the sandbox
PID_MAX_MIN = 301
LIBC = ctypes.CDLL(None, use_errno=True)


def cap_namespace_pids(processes: int) -> None:
    """Root is exempt from RLIMIT_NPROC (the kernel checks the real uid, in any user namespace): for it the
    bound is the PID namespace's own pid_max (Linux >= 6.14; the kernel's minimum is 301)."""
    try:
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(str(max(PID_MAX_MIN, processes + 2)))
    except OSError:
        pass


def enter_namespaces() -> bool:
    """New user + network + PID namespaces (Linux); False where the kernel or container refuses them."""
    try:
        return LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0
    except (OSError, AttributeError):
        return False


def limit_resources(memory_mb: int, cpu_s: int, processes: int, namespaced: bool) -> None:
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # RLIMIT_NPROC counts the processes of the user: inside a fresh user namespace only the grader's own (the
    # count is per namespace); outside, every process of the user, so the cap goes on top of those.
    if not namespaced:
        processes += sum(1 for entry in os.listdir("/proc") if entry.isdigit()
                         and _owner(f"/proc/{entry}") == os.getuid())
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


def _owner(path: str) -> int:
    try:
        return os.stat(path).st_uid
    except OSError:
        return -1


def restrict_files(writable: str) -> int:
    """Landlock: the whole file system read-only except `writable` (and /dev/null); returns the Landlock ABI
    version in force, 0 where the kernel has none (then nothing is restricted)."""
    abi = LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # flag 1: ask for the ABI version
    if abi <= 0:
        return 0
    handled = sum(bits for version, bits in LANDLOCK_WRITE.items() if abi >= version)
    if abi >= 6:  # struct landlock_ruleset_attr {u64 handled_access_fs, handled_access_net, scoped}
        attr, size = (ctypes.c_uint64 * 3)(handled, 0, LANDLOCK_SCOPE_SIGNAL), 24
    else:
        attr, size = (ctypes.c_uint64 * 1)(handled), 8
    ruleset = LIBC.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return 0
    for path, allowed in ((writable, handled), ("/dev/null", 1 << 1)):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = (ctypes.c_uint8 * 12)()  # struct landlock_path_beneath_attr {u64 allowed_access; s32 fd} packed
        ctypes.memmove(rule, ctypes.byref(ctypes.c_uint64(allowed)), 8)
        ctypes.memmove(ctypes.addressof(rule) + 8, ctypes.byref(ctypes.c_int32(fd)), 4)
        failed = LIBC.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0
        os.close(fd)
        if failed:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule({path}) failed")
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or LIBC.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return abi


def block_sockets() -> None:
    import _socket
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the grader sandbox")

    for module in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, refuse)


def failure(err: BaseException) -> dict:
    return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def serve(channel, setup: dict, namespaced: bool) -> None:
    """The worker: lock down, load the user's source, answer requests."""
    LIBC.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # without a PID namespace: die with the init at least

    def reply(payload: dict) -> None:
        sys.stdout.flush()  # the user's prints of this sample reach the error record before the reply
        sys.stderr.flush()
        channel.write(json.dumps(payload) + "\n")
        channel.flush()

    limit_resources(setup["memory_mb"], setup["cpu_s"], setup["processes"], namespaced)
    restrict_files(os.getcwd())
    block_sockets()
    scope = {"__name__": "grader"}
    try:
        exec(compile(setup["source"], "<grader source>", "exec"), scope)
        grade = scope["grade"]
    except BaseException as err:  # noqa: BLE001 - any failure of user code is reported, not raised
        reply({"id": setup["id"], "fatal": True, **failure(err)})
        return
    for line in sys.stdin:
        request = json.loads(line)
        try:
            value = grade(request["sample"], request["item"])
        except BaseException as err:  # noqa: BLE001 - includes MemoryError, SystemExit, KeyboardInterrupt
            reply({"id": request["id"], **failure(err)})
            continue
        if not isinstance(value, (int, float)) and callable(getattr(value, "item", None)):
            try:  # a numpy or torch scalar (np.int64 from .max(), a 0-d tensor): its Python number
                value = value.item()
            except (TypeError, ValueError, RuntimeError):
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            reply({"id": request["id"], "error": f"grade returned {type(value).__name__}, not a number"})
        else:
            reply({"id": request["id"], "value": float(value)})


def exit_code(status: int) -> int:
    """A wait status as an exit code: the process's own, or 128 + the signal that killed it (as a shell reports)."""
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def die_with_parent(parent: int | None = None, parent_pipe: int | None = None) -> None:
    """SIGKILL this process when its parent dies (a trainer SIGKILLed mid-grade must not leave the sandbox running),
    or exit now if the parent has already gone, before the prctl took hold: told by its pid `parent`, or where the
    parent's pid cannot be read (an init's reads 0 in its new PID namespace) by `parent_pipe`, the read end (closed
    here) of a pipe whose write end the parent alone holds, which reads EOF once the parent has died."""
    LIBC.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    if parent_pipe is not None:
        os.set_blocking(parent_pipe, False)
        try:
            gone = os.read(parent_pipe, 1) == b""
        except BlockingIOError:  # nothing to read and the write end still open: the parent lives
            gone = False
        os.close(parent_pipe)
        if gone:
            os._exit(1)


def main() -> None:
    die_with_parent(int(sys.argv[2]))
    channel = os.fdopen(int(sys.argv[1]), "w")
    setup = json.loads(sys.stdin.readline())
    namespaced = enter_namespaces()
    # The runner holds the pipe's write end while it lives: whether it died before the init's prctl took hold (a
    # trainer SIGKILLed just then: the init and its worker lived on, grading, once on a loaded CI machine).
    runner_gone, runner_alive = os.pipe()
    init = os.fork()  # with a new PID namespace this child is its PID 1
    if init:
        os.close(runner_gone)
        _, status = os.waitpid(init, 0)
        os._exit(exit_code(status))  # the worker's, which init passes on: the trainer's error record says it
    os.close(runner_alive)
    die_with_parent(parent_pipe=runner_gone)
    if namespaced:
        cap_namespace_pids(setup["processes"])
    worker = os.fork()
    if worker == 0:
        serve(channel, setup, namespaced)
        sys.stdout.flush()
        os._exit(0)
    channel.close()
    while True:  # reap orphans; when the worker is gone, exit, and the kernel ends the rest of the namespace
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == worker:
            os._exit(exit_code(status))


if __name__ == "__main__":
    main()
