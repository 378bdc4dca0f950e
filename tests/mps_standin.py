"""A stand-in for nvidia-cuda-mps-control (MPS needs a GPU): ``-f`` serves a real Unix
seqpacket control socket (the real one's kind, seen on the H200 with driver 580) in
$CUDA_MPS_PIPE_DIRECTORY until told ``quit``; without ``-f`` it is
the client, sending the command on stdin to that socket. Every step goes to
$CUDA_MPS_LOG_DIRECTORY/control.log, as the real daemon logs there.

Knobs: STANDIN_FAIL=1 exits at once (a daemon that will not start); STANDIN_DEAF=1
ignores ``quit`` (a daemon that hangs on stop); STANDIN_GATE=FIFO: the daemon answers only
once that FIFO has been opened for writing and closed (a slow start, held by the test).
"""

import os
import socket
import sys

pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
path = os.path.join(pipe, "control")


def log(line: str) -> None:
    with open(os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "control.log"), "a") as f:
        f.write(f"{line} pid={os.getpid()}\n")


if sys.argv[1:] == ["-f"]:
    if os.environ.get("STANDIN_FAIL"):
        print("cannot start: no GPU here", flush=True)
        sys.exit(3)
    if gate := os.environ.get("STANDIN_GATE"):
        with open(gate, "rb") as held:
            held.read()
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen()
    log(f"start pipe={pipe} visible={os.environ.get('CUDA_VISIBLE_DEVICES', '')}")
    while True:
        conn, _ = server.accept()
        with conn:
            command = conn.recv(100).decode().strip()
        if not command:
            continue  # a probe: connect and close
        log(f"command {command}")
        if command == "quit" and not os.environ.get("STANDIN_DEAF"):
            os.unlink(path)
            log("quit")
            sys.exit(0)
else:
    command = sys.stdin.read().strip()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        client.connect(path)
    except OSError:
        print("Cannot find MPS control daemon process", file=sys.stderr)
        sys.exit(1)
    client.sendall(command.encode())
    client.close()
