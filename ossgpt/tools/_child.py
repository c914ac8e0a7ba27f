"""What runs inside the sandboxed child. The parent (ossgpt/tools/sandbox.py) reads this file as
text and gives it to `python -I -u -c`, followed by `main(<config as JSON>)`, so it uses the
standard library only and never imports ossgpt (the package may not be readable from inside).

Process tree, from the parent's side:
  P0  `python -c`: joins the pids cgroup (where given), makes new user, mount, network, IPC, UTS
      and PID namespaces, forks P1 and waits for it.
  P1  pid 1 of the new PID namespace: mounts a fresh /proc, a tmpfs on /mnt with the scratch
      folder bound at /mnt/data and the session's tmp folder bound at /tmp (unless Python is
      installed under /tmp); forks P2, reaps orphans, and exits when P2 does (the kernel then
      kills everything left in the namespace).
  P2  sets the resource limits, no_new_privs, Landlock (files, TCP, signals, abstract sockets)
      and a seccomp filter, then runs the REPL loop or the one-shot program.
Any setup failure prints "ossgpt sandbox: ..." on stderr and exits with SETUP_FAILED: the parent
turns that into a refusal, never into running unconfined.
"""

import ast
import ctypes
import json
import os
import resource
import stat
import struct
import sys
import traceback

SETUP_FAILED = 125

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22

# Landlock (linux/landlock.h). Each ABI version handles more rights; all the running kernel knows
# are handled, so whatever no rule allows is denied.
LL_CREATE_RULESET, LL_ADD_RULE, LL_RESTRICT_SELF = 444, 445, 446   # same on x86_64 and arm64
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_TRUNCATE, LL_IOCTL_DEV = 1 << 14, 1 << 15
LL_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1,
                5: (1 << 16) - 1}
LL_FILE_ONLY = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
LL_NET_TCP = 3                      # BIND_TCP | CONNECT_TCP, from ABI 4
LL_SCOPE = 3                        # ABSTRACT_UNIX_SOCKET | SIGNAL, from ABI 6

# seccomp: syscalls refused with EPERM. socket() for every family: a Unix socket file reachable
# by path (a server's, a desktop bus's) is the one way out that the network namespace and Landlock
# leave open; socketpair() still works (multiprocessing). The rest are kernel attack surface or
# ways to undo the mounts, which nothing in a notebook needs.
SECCOMP_ARCH = {"x86_64": (0xC000003E, {"socket": 41, "ptrace": 101, "keyctl": 250,
                                        "add_key": 248, "request_key": 249, "bpf": 321,
                                        "perf_event_open": 298, "userfaultfd": 323,
                                        "mount": 165, "umount2": 166, "pivot_root": 155,
                                        "unshare": 272, "setns": 308, "process_vm_readv": 310,
                                        "process_vm_writev": 311, "kexec_load": 246}),
                "aarch64": (0xC00000B7, {"socket": 198, "ptrace": 117, "keyctl": 219,
                                         "add_key": 217, "request_key": 218, "bpf": 280,
                                         "perf_event_open": 241, "userfaultfd": 282,
                                         "mount": 40, "umount2": 39, "pivot_root": 41,
                                         "unshare": 97, "setns": 268, "process_vm_readv": 270,
                                         "process_vm_writev": 271, "kexec_load": 104})}

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
libc.unshare.argtypes = [ctypes.c_int]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p]


class SetupError(Exception):
    pass


def _check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")
    return result


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None          # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {target}")


# -- P0: namespaces ------------------------------------------------------------------------------

def enter_namespaces(cfg):
    if cfg.get("cgroup"):
        # before anything else, so every process the sandbox ever makes counts against pids.max
        _write(os.path.join(cfg["cgroup"], "cgroup.procs"), str(os.getpid()))
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID
                        | CLONE_NEWIPC | CLONE_NEWUTS), "unshare (user namespaces)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"0 {uid} 1")
    _write("/proc/self/gid_map", f"0 {gid} 1")


def wait_for(child):
    """Reap every child until `child` exits; return an exit status that carries its signal."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return SETUP_FAILED
        if pid == child:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) \
                else 128 + os.WTERMSIG(status)


# -- P1: mounts ----------------------------------------------------------------------------------

def make_mounts(cfg, info):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        info["proc"] = True             # a /proc that shows only the sandbox's processes
    except SetupError:
        info["proc"] = False            # then Landlock gives no access to /proc at all
    if not cfg["mounts"] or not os.path.isdir("/mnt"):
        return                          # then the scratch folder is used by its own path
    _mount("tmpfs", "/mnt", "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    os.mkdir("/mnt/data")
    _mount(cfg["scratch"], "/mnt/data", None, MS_BIND | MS_REC)
    info["data"] = "/mnt/data"
    # Python itself (e.g. a virtualenv made under /tmp) must stay visible: then the session's
    # tmp folder is used by its own path instead of covering /tmp.
    if any(p == "/tmp" or p.startswith("/tmp/") for p in cfg["read_paths"]):
        return
    # last: the scratch folder's own path may lie under /tmp, which this covers
    _mount(cfg["tmp"], "/tmp", None, MS_BIND | MS_REC)
    info["tmp"] = "/tmp"


# -- P2: limits, Landlock, seccomp ---------------------------------------------------------------

def set_limits(limits, confined):
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))      # SIGXCPU first, SIGKILL a second on
    for name, value in (("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_FSIZE", limits["file_bytes"]),
                        ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))
    if confined:
        # Set after the user namespace was made, so it counts the sandbox's processes only; an
        # unconfined child would count every process of the user on the machine.
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))


def landlock(cfg, info, fds):
    abi = libc.syscall(ctypes.c_long(LL_CREATE_RULESET), None, ctypes.c_long(0),
                       ctypes.c_long(1))                          # flag 1: ask for the ABI version
    if abi < 1:
        raise SetupError("Landlock is not available in this kernel (Linux 5.13+ with landlock "
                         "in the LSM list is needed)")
    fs = LL_FS_BY_ABI.get(abi, LL_FS_BY_ABI[5])
    net = LL_NET_TCP if abi >= 4 else 0
    scope = LL_SCOPE if abi >= 6 else 0
    attr = struct.pack("QQQ", fs, net, scope)[:8 if abi < 4 else 16 if abi < 6 else 24]
    ruleset = _check(libc.syscall(ctypes.c_long(LL_CREATE_RULESET), attr, ctypes.c_long(len(attr)),
                                  ctypes.c_long(0)), "landlock_create_ruleset")
    read_exec = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
    rules = [(path, read_exec) for path in cfg["read_paths"]]
    rules += [(fd, fs & ~LL_EXECUTE) for fd in fds]             # scratch and tmp: all but exec
    rules += [("/dev/null", LL_READ_FILE | LL_WRITE_FILE), ("/dev/zero", LL_READ_FILE),
              ("/dev/urandom", LL_READ_FILE), ("/dev/random", LL_READ_FILE)]
    if info.get("proc"):
        rules.append(("/proc", LL_READ_FILE | LL_READ_DIR))
    for where, access in rules:
        fd = where if isinstance(where, int) else os.open(where, os.O_PATH | os.O_CLOEXEC) \
            if os.path.exists(where) else None
        if fd is None:
            continue
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= LL_FILE_ONLY          # a rule on a file may hold only a file's rights
        rule = struct.pack("=Qi", access & fs, fd)
        _check(libc.syscall(ctypes.c_long(LL_ADD_RULE), ctypes.c_long(ruleset), ctypes.c_long(1),
                            rule, ctypes.c_long(0)), f"landlock rule for {where}")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.syscall(ctypes.c_long(LL_RESTRICT_SELF), ctypes.c_long(ruleset), ctypes.c_long(0)),
           "landlock_restrict_self")
    info["landlock"] = abi


def seccomp(info):
    arch = os.uname().machine
    if arch not in SECCOMP_ARCH:
        info["seccomp"] = False
        return
    audit_arch, numbers = SECCOMP_ARCH[arch]
    # classic BPF: check the arch, then refuse the listed syscall numbers with EPERM
    ret, allow, eperm, kill = 0x06, 0x7FFF0000, 0x00050000 | 1, 0x80000000
    nrs = sorted(numbers.values())
    prog = [(0x20, 0, 0, 4), (0x15, 1, 0, audit_arch), (ret, 0, 0, kill), (0x20, 0, 0, 0),
            # x86_64's x32 numbers (bit 30 set) reach the same syscalls: refused, all of them
            (0x35, len(nrs) + 1, 0, 0x40000000)]
    for i, nr in enumerate(nrs):
        # jump to the EPERM return (after the remaining checks and the ALLOW return) on a match
        prog.append((0x15, len(nrs) - i, 0, nr))
    prog += [(ret, 0, 0, allow), (ret, 0, 0, eperm)]
    code = b"".join(struct.pack("HBBI", *op) for op in prog)
    buf = ctypes.create_string_buffer(code)
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf)))
    _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0), "seccomp")
    info["seccomp"] = True


def confine(cfg):
    """Run in P0; returns in P2 (inside everything) with a dict saying what was set up."""
    info = {"data": None}
    # O_PATH handles on the scratch and tmp folders, opened before /tmp is covered by a mount
    fds = [os.open(cfg["scratch"], os.O_PATH | os.O_CLOEXEC), os.open(cfg["tmp"], os.O_PATH | os.O_CLOEXEC)]
    enter_namespaces(cfg)
    p1 = os.fork()
    if p1:
        os._exit(wait_for(p1))
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)       # P0 killed: the whole namespace goes with it
    make_mounts(cfg, info)
    p2 = os.fork()
    if p2:
        os._exit(wait_for(p2))
    set_limits(cfg["limits"], True)
    landlock(cfg, info, fds)
    seccomp(info)
    for fd in fds:
        os.close(fd)
    return info


# -- the REPL ------------------------------------------------------------------------------------

def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            sys.exit(0)                 # the parent closed the pipe: the session is over
        data += chunk
    return data


def run_cell(code, env, number, me):
    """Execute one message like a notebook cell: the value of a final expression is printed.
    `me` is the REPL's pid: a process the cell forked that falls through to here ends quietly
    instead of printing its own copy of the error (a fork bomb's hundred tracebacks)."""
    name = f"<cell {number}>"
    import linecache
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try:
        tree = ast.parse(code, name)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, name, "exec"), env)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), name, "eval"), env)
            if value is not None:
                env["_"] = value
                print(repr(value))
    except SystemExit as e:
        if os.getpid() != me:           # a forked child's sys.exit() ends that child
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        print(f"SystemExit: {e.code}", file=sys.stderr)
    except BaseException as e:          # noqa: BLE001 - KeyboardInterrupt, MemoryError too
        if os.getpid() != me:
            os._exit(1)
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != name:
            tb = tb.tb_next             # start the traceback at the cell, not at this loop
        traceback.print_exception(type(e), e, tb)


def repl(control_fd, info):
    env = {"__name__": "__main__", "__builtins__": __builtins__}
    os.write(control_fd, (json.dumps(info) + "\n").encode())
    number, me = 0, os.getpid()
    while True:
        (size,) = struct.unpack("<Q", read_exact(8))
        code = read_exact(size).decode("utf-8")
        number += 1
        run_cell(code, env, number, me)
        if os.getpid() != me:
            os._exit(0)                 # a child the cell forked that fell through: not a 2nd REPL
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(control_fd, b"done\n")


def main(cfg):
    control_fd = cfg["control_fd"]
    try:
        if cfg["confine"]:
            info = confine(cfg)
        else:
            info = {"data": None}
            set_limits(cfg["limits"], False)
    except (SetupError, OSError) as e:
        print(f"ossgpt sandbox: {e}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    home = info["data"] or cfg["scratch"]
    os.chdir(home)
    os.environ.update(HOME=home, TMPDIR=info.get("tmp") or cfg["tmp"])
    del sys.argv[1:]
    if cfg["mode"] == "repl":
        repl(control_fd, info)
    else:
        os.close(control_fd)
        path = os.path.join(home, cfg["program"])
        sys.argv[0] = path
        with open(path) as f:
            code = f.read()
        exec(compile(code, path, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
