"""One process of a multi-process run, watched by a small parent process.

JAX's multi-controller runtime ends a process whose peer is missing or dead with a C++ abort: a
`Check failure stack trace` on stderr and exit status 134, after `--distributed_init_timeout` seconds
when a process never joins, or when the coordination service reports a peer that died or stopped
sending heartbeats (`--distributed_heartbeat_timeout`). Python cannot catch that abort, so a
multi-process command runs in a child process (`python -m scaling_sparse ...`, the same arguments):
- the child's Python output (progress bar, messages, tracebacks: `sys.stderr`) goes straight to this
  process's stderr through an inherited descriptor, unchanged and as it is written;
- what the C++ runtime writes to the child's file descriptor 2 (its log lines, the stack dump) goes to
  `runtime.log` (in WORKDIR/logs/ when the work directory exists, else a temporary folder);
- when the runtime aborted the child, one message names what happened (the missing or dead process, the
  flag to change, what is intact) and the exit status is 1.
SIGINT, SIGTERM and SIGHUP sent to this process are passed on once (the child has its own session, so
Ctrl-C in a terminal reaches it once, through here); the child gets SIGTERM if this process dies.
No JAX here: the parent starts in milliseconds and does not touch the devices.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading

WATCHED_ENV = "SCALING_SPARSE_WATCHED_STDERR_FD"  # set in the child: the descriptor of the real stderr
MULTI_PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id")
RUNTIME_LOG = "runtime.log"
EXIT_PEER_FAILURE = 1
DEFAULT_INIT_TIMEOUT_S = 300  # JAX's own defaults for --distributed_init_timeout, --distributed_heartbeat_timeout
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
# A collective whose peer is gone fails with these (as JaxRuntimeError, or ValueError out of process_allgather).
_COLLECTIVE_FAILED = re.compile(r"Gloo|NCCL|Connection closed by peer|Connection reset|UNAVAILABLE|DEADLINE_EXCEEDED")
# The runtime's abort text, by cause.
_NEVER_JOINED = re.compile(r"RegisterTask|Wait_for_all_tasks_to_register|cluster registration failed")
_PEER_FAILED = re.compile(r"heartbeat|another task died|detected fatal errors|UNAVAILABLE|task died|"
                          r"disconnected|Connection reset|has been shut down|preempt", re.IGNORECASE)


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of --name=V or --name V in argv (absl syntax), the last one given; None if absent."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def wanted(argv: list[str]) -> bool:
    """True for a multi-process command not yet watched: any of the three flags given, or a cluster JAX
    detects by itself (distributed.py)."""
    if "SCALING_SPARSE_WATCHED" in os.environ or any(a in ("--help", "--helpfull", "-h") for a in argv):
        return False
    if not {"train", "eval", "generate", "compress"} & set(argv[1:]):
        return False
    return any(flag_value(argv, f) is not None for f in MULTI_PROCESS_FLAGS) or cluster_detected()


def cluster_detected() -> bool:
    """True under a scheduler or slice JAX's auto-detection handles (SLURM with several tasks,
    a multi-host Cloud TPU slice)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def child_setup() -> None:
    """In the watched child, first thing: Python's stderr is the parent's real stderr (fd 2, and
    sys.__stderr__, stay the runtime log pipe)."""
    fd = os.environ.pop(WATCHED_ENV, None)
    if fd is not None:
        sys.stderr = os.fdopen(int(fd), "w", buffering=1, closefd=False)


def watched() -> bool:
    return "SCALING_SPARSE_WATCHED" in os.environ


def log_fatal_dumps() -> None:
    """In a watched child: Python's own fatal-signal dump (faulthandler, which absl enables on the console)
    goes to the runtime log with the C++ one."""
    if watched():
        import faulthandler

        faulthandler.enable(file=sys.__stderr__)


def peer_failure_message(error: BaseException, workdir: str | None) -> str | None:
    """For an error raised by a collective with another process of a multi-process run (the peer died:
    "Connection closed by peer"), the message to print; None for any other error."""
    runtime = type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
    if not (runtime or _COLLECTIVE_FAILED.search(str(error))) or "jax" not in sys.modules:
        return None
    import jax

    if jax.process_count() == 1:
        return None
    first = str(error).strip().splitlines()[0][:240]
    kept = f" in {workdir}/checkpoints" if workdir else ""
    return (f"process {jax.process_index()} of {jax.process_count()} stopped: an exchange with the other processes "
            f"failed ({first}): another process died or was stopped. The checkpoints already saved{kept} are "
            "intact; no step after the last one was saved. Fix: start every process again with the same command "
            "to resume from the latest checkpoint")


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM (a graceful stop: it saves) if the watching parent is killed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_watched(argv: list[str]) -> int:
    """Runs `python -m scaling_sparse argv[1:]` in a child, relays its signals, and turns a runtime abort
    into one message. -> the exit status for this process."""
    real_stderr = os.dup(2)
    os.set_inheritable(real_stderr, True)
    env = dict(os.environ, **{WATCHED_ENV: str(real_stderr), "SCALING_SPARSE_WATCHED": "1"})
    env.setdefault("PYTHONUNBUFFERED", "1")
    child = subprocess.Popen([sys.executable, "-m", "scaling_sparse", *argv[1:]], stderr=subprocess.PIPE,
                             env=env, pass_fds=(real_stderr,), start_new_session=True,
                             preexec_fn=_die_with_parent)
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stderr.readline, b"")), daemon=True)
    reader.start()

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    reader.join(timeout=10)
    os.close(real_stderr)
    runtime_text = b"".join(lines).decode(errors="replace")
    log = _keep_log(runtime_text, flag_value(argv, "workdir"), flag_value(argv, "process_id"))
    if code >= 0:  # the child ended by itself: its own messages (and exit status) said what happened
        return code
    message = explain_abort(runtime_text, -code, argv, log)
    if not message:  # e.g. SIGKILL from outside: the shell's usual status
        return 128 - code
    print(f"error: {message}", file=sys.stderr)
    return EXIT_PEER_FAILURE


def _keep_log(text: str, workdir: str | None, process_id: str | None) -> pathlib.Path | None:
    if not text.strip():
        return None
    name = RUNTIME_LOG if process_id is None else f"runtime.process_{process_id}.log"
    folder = pathlib.Path(workdir) / "logs" if workdir and pathlib.Path(workdir).is_dir() else None
    try:
        if folder is None:
            folder = pathlib.Path(tempfile.mkdtemp(prefix="scaling_sparse_runtime_"))
        folder.mkdir(exist_ok=True)
        path = folder / name
        with open(path, "a") as f:
            f.write(text)
        return path
    except OSError:
        return None


def coordinator_answers(address: str, timeout: float = 2.0) -> bool:
    """True if something accepts TCP connections at HOST:PORT."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def explain_abort(text: str, signum: int, argv: list[str], log: pathlib.Path | None) -> str:
    """One message for a child the runtime (or a signal) ended: what happened, which process, the fix."""
    count, index = flag_value(argv, "num_processes"), flag_value(argv, "process_id")
    address = flag_value(argv, "coordinator_address")
    init = flag_value(argv, "distributed_init_timeout") or DEFAULT_INIT_TIMEOUT_S
    beat = flag_value(argv, "distributed_heartbeat_timeout") or DEFAULT_HEARTBEAT_TIMEOUT_S
    me = f"process {index}" if index is not None else "this process"
    where = f" (the runtime's log: {log})" if log else ""
    if _NEVER_JOINED.search(text):
        if index == "0" or index is None:
            others = "process 1" if count == "2" else f"processes 1..{int(count) - 1}" if count else "the other processes"
            missing = (f"{others} did not connect to this coordinator at {address}" if address else
                       "not every process of the cluster connected")
        elif address and not coordinator_answers(address):
            missing = f"process 0 (the coordinator at {address}) is not running or not reachable from here"
        else:
            missing = (f"process 0's coordinator at {address} answers but not all {count} processes joined "
                       "(another process is missing, or was started with other --num_processes)")
        return (f"{me} gave up waiting for the run's {count or 'other'} processes after "
                f"--distributed_init_timeout={init} s: {missing}. Nothing was trained or written. Fix: start every "
                f"process with the same --coordinator_address and --num_processes and its own --process_id "
                f"within that time (or raise --distributed_init_timeout){where}")
    if signum == signal.SIGABRT and _PEER_FAILED.search(text):
        named = re.findall(r"/task:(\d+)|Task (\d+) heartbeat|stopped sending heartbeats\):\s*(\d+)", text)
        tasks = sorted({int(t) for groups in named for t in groups if t} - ({int(index)} if index else set()))
        who = (f"process {', '.join(map(str, tasks))}" if tasks else "another process of the run")
        return (f"{me} stopped: {who} died or stopped answering (the runtime's heartbeat timeout is "
                f"--distributed_heartbeat_timeout={beat} s). The checkpoints already saved are intact; no step "
                f"after the last one was saved. Fix: start every process again with the same command to resume "
                f"from the latest checkpoint{where}")
    if signum == signal.SIGABRT and text.strip():
        last = [line for line in text.strip().splitlines() if line.strip()][-1][:300]
        return (f"{me} was aborted by JAX's runtime ({last}). The checkpoints already saved are intact; run the "
                f"same command again to resume{where}")
    return ""
